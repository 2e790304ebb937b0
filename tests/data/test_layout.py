"""Layouts of a token stream: BPTT stream columns and Block TPROP's blocks, checked against
independent reference implementations, and checked to be views (no copies)."""

from __future__ import annotations

import pytest
import torch

from tprop.data import Blocks, StreamColumns


def stream(T: int, seed: int = 0) -> torch.Tensor:
    """A 1-D int64 stream whose values identify positions (distinct, shuffled)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(T, generator=g) + 1000


def storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


# --------------------------------------------------------------------------- references


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    """pytorch/examples word_language_model's batchify: contiguous chunks as columns."""
    nbatch = data.size(0) // bsz
    data = data.narrow(0, 0, nbatch * bsz)
    return data.view(bsz, -1).t().contiguous()


def ref_columns(data: torch.Tensor, B: int) -> tuple[list[list[int]], list[list[int]]]:
    """inputs[t][b] = x[b*n + t], targets[t][b] = x[b*n + t + 1], n = (T-1) // B."""
    x = data.tolist()
    n = (len(x) - 1) // B
    inputs = [[x[b * n + t] for b in range(B)] for t in range(n)]
    targets = [[x[b * n + t + 1] for b in range(B)] for t in range(n)]
    return inputs, targets


def ref_windows(n: int, K: int, drop_last: bool) -> list[tuple[int, int]]:
    """(first row, length) of the windows over n rows (get_batch's i and seq_len)."""
    out = []
    for i in range(0, n, K):
        k = min(K, n - i)
        if k < K and drop_last:
            break
        out.append((i, k))
    return out


# --------------------------------------------------------------------------- StreamColumns


@pytest.mark.parametrize("T,B", [(101, 4), (100, 4), (97, 5), (20, 1), (11, 10), (57, 7)])
def test_columns_match_reference(T, B):
    data = stream(T)
    cols = StreamColumns(data, B)
    n = (T - 1) // B
    assert cols.length == n and cols.batch_size == B
    assert cols.inputs.shape == (n, B) and cols.targets.shape == (n, B)
    assert cols.num_tokens == n * B
    ref_in, ref_tg = ref_columns(data, B)
    assert cols.inputs.tolist() == ref_in
    assert cols.targets.tolist() == ref_tg
    # batchify semantics: the inputs are batchify of the first n*B tokens, the targets are
    # batchify of the same stream shifted by one token
    assert torch.equal(cols.inputs, batchify(data[: n * B], B))
    assert torch.equal(cols.targets, batchify(data[1 : n * B + 1], B))
    # column b is the contiguous chunk b of the stream
    for b in range(B):
        assert torch.equal(cols.inputs[:, b], data[b * n : (b + 1) * n])
        assert torch.equal(cols.targets[:, b], data[b * n + 1 : (b + 1) * n + 1])
    # inside a column a target is the next row's input
    assert torch.equal(cols.targets[:-1], cols.inputs[1:])


def test_columns_when_T_divisible_by_B_drop_one_column_of_predictions():
    # T = 100, B = 4: n = 24 (not 25), because the last token of the stream has no target
    data = torch.arange(100)
    cols = StreamColumns(data, 4)
    assert cols.length == 24
    assert cols.inputs[:, 3].tolist() == list(range(72, 96))
    assert cols.targets[-1].tolist() == [24, 48, 72, 96]


@pytest.mark.parametrize("T,B,K", [(101, 4, 5), (101, 4, 25), (97, 5, 7), (30, 1, 4),
                                   (57, 7, 8), (57, 7, 100)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_windows_cover_columns_in_order(T, B, K, drop_last):
    data = stream(T, seed=T + K)
    cols = StreamColumns(data, B)
    n = (T - 1) // B
    ref = ref_windows(n, K, drop_last)
    assert cols.num_windows(K, drop_last=drop_last) == len(ref)
    wins = list(cols.windows(K, drop_last=drop_last))
    assert len(wins) == len(ref)
    ref_in, ref_tg = ref_columns(data, B)
    for (x, y), (i, k) in zip(wins, ref):
        assert x.shape == y.shape == (k, B)
        assert x.tolist() == ref_in[i : i + k]
        assert y.tolist() == ref_tg[i : i + k]
    if wins:
        # concatenated, the windows are the columns (minus a dropped partial tail)
        covered = sum(k for _, k in ref)
        assert torch.equal(torch.cat([x for x, _ in wins]), cols.inputs[:covered])
        assert torch.equal(torch.cat([y for _, y in wins]), cols.targets[:covered])
        assert covered == (n if not drop_last else n - n % K)


def test_num_windows_and_drop_last():
    cols = StreamColumns(torch.arange(101), 4)  # n = 25
    assert cols.num_windows(5) == 5 and cols.num_windows(5, drop_last=False) == 5
    assert cols.num_windows(7) == 3 and cols.num_windows(7, drop_last=False) == 4
    assert cols.num_windows(25) == 1 and cols.num_windows(26) == 0
    assert cols.num_windows(26, drop_last=False) == 1
    assert cols.num_windows(1) == 25
    last_x, last_y = list(cols.windows(7, drop_last=False))[-1]
    assert last_x.shape == (4, 4)  # 25 = 3*7 + 4
    assert last_x[:, 0].tolist() == [21, 22, 23, 24]
    assert last_y[:, 3].tolist() == [97, 98, 99, 100]
    assert [x.shape[0] for x, _ in cols.windows(7)] == [7, 7, 7]
    assert list(cols.windows(26)) == []


@pytest.mark.parametrize("drop_last", [True, False])
def test_windows_start(drop_last):
    cols = StreamColumns(stream(203), 3)  # n = 67
    full = list(cols.windows(10, drop_last=drop_last))
    assert len(full) == (6 if drop_last else 7)
    for start in range(len(full) + 2):
        part = list(cols.windows(10, drop_last=drop_last, start=start))
        assert len(part) == max(0, len(full) - start)
        for (x, y), (fx, fy) in zip(part, full[start:]):
            assert torch.equal(x, fx) and torch.equal(y, fy)
    x, _ = next(cols.windows(10, start=2))
    assert torch.equal(x, cols.inputs[20:30])


def test_columns_are_views_of_the_stream():
    big = stream(500)
    data = big[7:408]  # a view with a storage offset: still no copy
    cols = StreamColumns(data, 4)  # n = 100
    ptr = storage_ptr(data)
    assert storage_ptr(cols.inputs) == ptr and storage_ptr(cols.targets) == ptr
    assert cols.inputs.storage_offset() == data.storage_offset()
    assert cols.targets.storage_offset() == data.storage_offset() + 1
    assert cols.inputs.stride() == (1, 100)
    for w, (x, y) in enumerate(cols.windows(30, drop_last=False)):
        assert storage_ptr(x) == ptr and storage_ptr(y) == ptr
        assert x.storage_offset() == data.storage_offset() + 30 * w
        assert y.storage_offset() == data.storage_offset() + 30 * w + 1
        assert x.stride() == y.stride() == (1, 100)
    # writes through the stream are seen by the columns and the windows (shared memory)
    x0, y0 = next(cols.windows(30))
    data[0] = -1
    data[101] = -2
    assert int(cols.inputs[0, 0]) == -1 and int(x0[0, 0]) == -1
    assert int(cols.inputs[1, 1]) == -2 and int(y0[0, 1]) == -2
    assert int(big[7]) == -1


def test_columns_errors():
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        StreamColumns(torch.arange(10), 0)
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        StreamColumns(torch.arange(10), -3)
    with pytest.raises(ValueError, match="too few"):
        StreamColumns(torch.arange(1), 1)
    with pytest.raises(ValueError, match="too few"):
        StreamColumns(torch.arange(4), 4)  # needs B + 1 tokens
    with pytest.raises(ValueError, match="too few"):
        StreamColumns(torch.arange(0), 1)
    with pytest.raises(ValueError, match="1-D"):
        StreamColumns(torch.arange(12).view(3, 4), 2)
    assert StreamColumns(torch.arange(5), 4).inputs.tolist() == [[0, 1, 2, 3]]


# --------------------------------------------------------------------------- Blocks


@pytest.mark.parametrize("T,K", [(101, 10), (100, 10), (11, 10), (2, 1), (37, 1), (64, 7)])
def test_blocks_match_per_block_loop(T, K):
    data = stream(T, seed=K)
    blocks = Blocks(data, K)
    N = (T - 1) // K
    assert blocks.num_blocks == N and blocks.block_size == K
    assert blocks.num_tokens == N * K
    assert blocks.inputs.shape == blocks.targets.shape == (N, K)
    x = data.tolist()
    for j in range(N):
        assert blocks.inputs[j].tolist() == [x[j * K + i] for i in range(K)]
        assert blocks.targets[j].tolist() == [x[j * K + i + 1] for i in range(K)]
        assert torch.equal(blocks.inputs[j], data[j * K : j * K + K])
        assert torch.equal(blocks.targets[j], data[j * K + 1 : j * K + K + 1])


def test_blocks_count_floor_of_T_minus_1_over_K():
    assert Blocks(torch.arange(100), 10).num_blocks == 9  # 99 // 10
    assert Blocks(torch.arange(101), 10).num_blocks == 10
    assert Blocks(torch.arange(110), 10).num_blocks == 10
    assert Blocks(torch.arange(111), 10).num_blocks == 11


def test_blocks_span_is_time_major():
    data = torch.arange(61)
    blocks = Blocks(data, 6)  # N = 10
    x, y = blocks.span(2, 5)
    assert x.shape == y.shape == (6, 3)
    for c, j in enumerate(range(2, 5)):
        assert x[:, c].tolist() == list(range(6 * j, 6 * j + 6))
        assert y[:, c].tolist() == list(range(6 * j + 1, 6 * j + 7))
    assert x[0].tolist() == [12, 18, 24]  # first step of each block
    full_x, full_y = blocks.span(0, blocks.num_blocks)
    assert torch.equal(full_x, blocks.inputs.t()) and torch.equal(full_y, blocks.targets.t())
    one_x, _ = blocks.span(9, 10)
    assert one_x.shape == (6, 1) and one_x[:, 0].tolist() == list(range(54, 60))


def test_blocks_are_views_of_the_stream():
    big = stream(300)
    data = big[3:254]
    blocks = Blocks(data, 5)  # N = 50
    ptr = storage_ptr(data)
    assert storage_ptr(blocks.inputs) == ptr and storage_ptr(blocks.targets) == ptr
    assert blocks.inputs.storage_offset() == data.storage_offset()
    assert blocks.targets.storage_offset() == data.storage_offset() + 1
    x, y = blocks.span(4, 9)
    assert storage_ptr(x) == ptr and storage_ptr(y) == ptr
    assert x.storage_offset() == data.storage_offset() + 20
    assert x.stride() == (1, 5)
    data[20] = -7  # block 4, step 0; block 3's last target
    assert int(x[0, 0]) == -7
    assert int(blocks.targets[3, 4]) == -7


def test_blocks_errors():
    with pytest.raises(ValueError, match="block size must be >= 1"):
        Blocks(torch.arange(10), 0)
    with pytest.raises(ValueError, match="block size must be >= 1"):
        Blocks(torch.arange(10), -1)
    with pytest.raises(ValueError, match="too few"):
        Blocks(torch.arange(10), 10)  # needs K + 1 tokens
    with pytest.raises(ValueError, match="too few"):
        Blocks(torch.arange(1), 1)
    with pytest.raises(ValueError, match="1-D"):
        Blocks(torch.arange(12).view(3, 4), 2)
    assert Blocks(torch.arange(11), 10).num_blocks == 1


@pytest.mark.parametrize("T,K", [(101, 10), (100, 10), (50, 1), (64, 7)])
def test_one_column_windows_are_the_blocks(T, K):
    data = stream(T, seed=3)
    cols = StreamColumns(data, 1)
    blocks = Blocks(data, K)
    wins = list(cols.windows(K, drop_last=True))
    assert len(wins) == cols.num_windows(K) == blocks.num_blocks
    for j, (x, y) in enumerate(wins):
        assert x.shape == (K, 1)
        assert torch.equal(x[:, 0], blocks.inputs[j])
        assert torch.equal(y[:, 0], blocks.targets[j])
        bx, by = blocks.span(j, j + 1)
        assert torch.equal(x, bx) and torch.equal(y, by)
