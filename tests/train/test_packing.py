import pytest
import torch

from lasp2.train.packing import IGNORE_INDEX, pack_documents


def test_packing_splits_pads_and_labels():
    docs = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11]]
    seqs = list(pack_documents(docs, 4, multiple_of=2, pad_id=0))
    assert [s.tokens.tolist() for s in seqs] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 0]]
    assert [s.cu_seqlens.tolist() for s in seqs] == [[0, 3, 4], [0, 4], [0, 1, 3, 4]]
    I = IGNORE_INDEX
    assert seqs[0].labels.tolist() == [2, 3, I, I]
    assert seqs[1].labels.tolist() == [6, 7, 8, I]
    assert seqs[2].labels.tolist() == [I, 11, I, I]
    assert seqs[2].n_padding == 1 and seqs[0].n_padding == 0
    # every token of every document appears exactly once, in order: nothing dropped
    flat = [t for s in seqs for t in s.tokens[: len(s.tokens) - s.n_padding].tolist()]
    assert flat == [t for d in docs for t in d]


def test_packing_rejects_lengths_that_do_not_split():
    with pytest.raises(ValueError, match="multiple of 4"):
        list(pack_documents([[1, 2]], 6, multiple_of=4))


def test_packed_cu_seqlens_are_valid_for_the_ops():
    import lasp2

    seq = next(pack_documents([[1] * 5, [2] * 9, [3] * 20], 32, multiple_of=4))
    q = torch.randn(1, 32, 2, 4)
    o, _ = lasp2.linear_attention(q, q, q, cu_seqlens=seq.cu_seqlens)
    assert o.shape == (1, 32, 2, 4)
