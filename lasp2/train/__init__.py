"""Training: data (MQAR, byte-level text), packing, the loop, checkpoints and ``lasp2 train``.

    from lasp2.train import TrainConfig, train        # train(cfg) on every rank of a process group
    cfg = TrainConfig(sp=2, seq_len=2048, steps=250)  # validated; flags of ``lasp2 train`` map 1:1
"""
from .config import TrainConfig
from .data import TextData, mqar_batch
from .loop import train
from .packing import IGNORE_INDEX, PackedSequence, pack_documents

__all__ = ["TrainConfig", "train", "mqar_batch", "TextData", "pack_documents", "PackedSequence", "IGNORE_INDEX"]
