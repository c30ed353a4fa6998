"""Decoding batches side by side: how many, how they are cut, results in order."""

from __future__ import annotations

import threading

from pipeline.parallel_decode import decode_streams, even_batches, model_streams, parallel_map


def test_two_streams_on_a_cpu_with_two_cores_or_more_one_on_a_gpu() -> None:
    assert decode_streams("cpu", 2) == 2 and decode_streams("cpu", 16) == 2
    assert decode_streams("cpu", 1) == 1 and decode_streams("cuda", 8) == 1

    class M:
        ecg_parallel = 2

    assert model_streams(M(), None) == 2 and model_streams(object()) == 1


def test_batches_are_even_and_come_in_pairs_for_two_streams() -> None:
    sizes = lambda n, b, s: [len(r) for r in even_batches(n, b, s)]  # noqa: E731
    assert sizes(27, 8, 2) == [7, 7, 7, 6]
    assert sizes(23, 8, 1) == [8, 8, 7]
    assert sizes(3, 8, 2) == [2, 1]
    assert sizes(1, 8, 2) == [1] and sizes(0, 8, 2) == []
    assert [i for r in even_batches(27, 8, 2) for i in r] == list(range(27))


def test_parallel_map_runs_batches_at_once_and_keeps_their_order() -> None:
    both = threading.Barrier(2, timeout=30)  # broken unless two calls wait at the same time

    def work(x: int) -> int:
        if x < 2:
            both.wait()
        return x * 10

    assert list(parallel_map(2, work, [0, 1, 2, 3])) == [0, 10, 20, 30]
    assert list(parallel_map(1, lambda x: x + 1, [1, 2])) == [2, 3]


def test_loading_a_model_for_two_streams_leaves_torch_its_threads() -> None:
    import torch

    from pipeline.transcribe import load_asr_model

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = load_asr_model("embedded", threads=2)
        assert model.ecg_parallel == 2
        assert torch.get_num_threads() == 2  # CTranslate2's one thread per stream set it to 1
    finally:
        torch.set_num_threads(before)
