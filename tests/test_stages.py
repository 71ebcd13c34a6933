"""Stage math, on synthetic marks: exact partition, no negatives, per-step spans."""
from __future__ import annotations

import numpy as np
import pytest

from stagetrace.labels import Kind, index_of, kind_of, label
from stagetrace import stages as stages_module
from stagetrace.stages import StageOrderError, stages_from_marks

K = Kind


def marks(*pairs):
    """(kind, t) or ((kind, index), t) pairs -> (labels, times) arrays."""
    labels = [label(*k) if isinstance(k, tuple) else label(k) for k, _ in pairs]
    return np.array(labels, dtype=np.int32), np.array([t for _, t in pairs], dtype=np.int64)


def vlm_call():
    # entry, vision 10..40, forward@45, LM 50..90 (prefill), 3 decode steps, return 160
    return marks((K.CALL_BEGIN, 0), (K.VISION_BEGIN, 10), (K.VISION_END, 30), (K.VISION_BEGIN, 31),
                 (K.VISION_END, 40), (K.PREFILL_FORWARD, 45), (K.LM_BEGIN, 50), (K.LM_HEAD_END, 90),
                 (K.DECODE_FORWARD, 100), (K.DECODE_FORWARD, 120), (K.DECODE_FORWARD, 145), (K.CALL_END, 160))


def test_labels_carry_kind_and_index():
    lab = np.array([label(K.LAYER_BEGIN, 37), label(K.CALL_END)])
    assert kind_of(lab).tolist() == [K.LAYER_BEGIN, K.CALL_END]
    assert index_of(lab).tolist() == [37, 0]


def test_a_vlm_call_partitions_exactly_into_vision_prefill_decode_and_other():
    st = stages_from_marks(*vlm_call())
    assert st.total_ns == 160
    assert st.vision_ns == 30          # first vision start to last vision end
    assert st.prefill_ns == 40         # LM start to lm_head end
    assert st.decode_ns == 60          # first decode forward to return
    assert st.other_ns == 160 - 30 - 40 - 60
    assert st.vision_ns + st.prefill_ns + st.decode_ns + st.other_ns == st.total_ns
    assert st.ttft_ns == 100
    assert st.decode_step_ns == [20, 25, 15]
    assert sum(st.decode_step_ns) == st.decode_ns


def test_spans_nest_call_stage_step():
    st = stages_from_marks(*vlm_call())
    names = [(s.name, s.depth) for s in st.spans]
    assert names == [("generate", 0), ("vision", 1), ("prefill", 1), ("decode", 1), ("step 0", 2),
                     ("step 1", 2), ("step 2", 2)]


def test_text_only_call_has_no_vision_stage_not_a_zero_one():
    lab, t = marks((K.CALL_BEGIN, 0), (K.PREFILL_FORWARD, 5), (K.LM_BEGIN, 6), (K.LM_HEAD_END, 20),
                   (K.DECODE_FORWARD, 22), (K.CALL_END, 30))
    st = stages_from_marks(lab, t)
    assert st.vision_ns is None
    assert st.prefill_ns == 14 and st.decode_ns == 8 and st.other_ns == 8


def test_a_single_token_call_has_zero_decode_and_ttft_equal_to_total():
    lab, t = marks((K.CALL_BEGIN, 0), (K.PREFILL_FORWARD, 5), (K.LM_BEGIN, 6), (K.LM_HEAD_END, 20),
                   (K.CALL_END, 30))
    st = stages_from_marks(lab, t)
    assert st.decode_ns == 0 and st.decode_step_ns == [] and st.ttft_ns == st.total_ns == 30


def test_chunked_prefill_spans_from_first_chunk_start_to_last_chunk_head():
    lab, t = marks((K.CALL_BEGIN, 0), (K.PREFILL_FORWARD, 2), (K.LM_BEGIN, 3), (K.LM_HEAD_END, 10),
                   (K.PREFILL_FORWARD, 12), (K.LM_BEGIN, 13), (K.LM_HEAD_END, 25), (K.DECODE_FORWARD, 30),
                   (K.CALL_END, 40))
    st = stages_from_marks(lab, t)
    assert st.prefill_ns == 22 and st.decode_ns == 10 and st.other_ns == 8


def test_vision_inside_the_first_forward_counts_before_the_language_model():
    # Molmo: vision runs inside forward 0, before the first block
    lab, t = marks((K.CALL_BEGIN, 0), (K.PREFILL_FORWARD, 1), (K.VISION_BEGIN, 2), (K.VISION_END, 12),
                   (K.LM_BEGIN, 14), (K.LM_HEAD_END, 30), (K.DECODE_FORWARD, 31), (K.CALL_END, 40))
    st = stages_from_marks(lab, t)
    assert (st.vision_ns, st.prefill_ns, st.decode_ns, st.other_ns) == (10, 16, 9, 5)


def test_vision_rerun_inside_decode_steps_belongs_to_those_steps():
    lab, t = marks((K.CALL_BEGIN, 0), (K.PREFILL_FORWARD, 1), (K.VISION_BEGIN, 2), (K.VISION_END, 12),
                   (K.LM_BEGIN, 14), (K.LM_HEAD_END, 30), (K.DECODE_FORWARD, 31), (K.VISION_BEGIN, 32),
                   (K.VISION_END, 38), (K.CALL_END, 50))
    st = stages_from_marks(lab, t)
    assert st.vision_ns == 10 and st.decode_ns == 19 and st.decode_step_ns == [19]


def test_without_lm_marks_prefill_runs_from_after_vision_to_the_first_step():
    lab, t = marks((K.CALL_BEGIN, 0), (K.PREFILL_FORWARD, 1), (K.VISION_BEGIN, 2), (K.VISION_END, 12),
                   (K.DECODE_FORWARD, 31), (K.CALL_END, 40))
    st = stages_from_marks(lab, t)
    assert st.prefill_ns == 19 and st.other_ns == 2


def test_layer_marks_become_nested_spans_in_prefill_and_in_each_step():
    lab, t = marks((K.CALL_BEGIN, 0), (K.PREFILL_FORWARD, 1), (K.LM_BEGIN, 2), ((K.LAYER_BEGIN, 0), 3),
                   ((K.LAYER_END, 0), 5), ((K.LAYER_BEGIN, 1), 5), ((K.LAYER_END, 1), 8), (K.LM_HEAD_END, 9),
                   (K.DECODE_FORWARD, 10), ((K.LAYER_BEGIN, 0), 11), ((K.LAYER_END, 0), 12), (K.CALL_END, 15))
    st = stages_from_marks(lab, t)
    layer_spans = [(s.name, s.start_ns, s.end_ns, s.depth) for s in st.spans if s.name.startswith("layer")]
    assert layer_spans == [("layer 0", 3, 5, 2), ("layer 1", 5, 8, 2), ("layer 0", 11, 12, 3)]


def test_shared_layer_marks_end_each_layer_where_the_next_begins():
    """layer_marks="shared": one mark per boundary, and only the last layer's end."""
    lab, t = marks((K.CALL_BEGIN, 0), (K.PREFILL_FORWARD, 1), (K.LM_BEGIN, 2), ((K.LAYER_BEGIN, 0), 3),
                   ((K.LAYER_BEGIN, 1), 5), ((K.LAYER_BEGIN, 2), 6), ((K.LAYER_END, 2), 8), (K.LM_HEAD_END, 9),
                   (K.DECODE_FORWARD, 10), ((K.LAYER_BEGIN, 0), 11), ((K.LAYER_BEGIN, 1), 12),
                   ((K.LAYER_BEGIN, 2), 13), ((K.LAYER_END, 2), 14), (K.CALL_END, 15))
    st = stages_from_marks(lab, t)
    layer_spans = [(s.name, s.start_ns, s.end_ns) for s in st.spans if s.name.startswith("layer")]
    assert layer_spans == [("layer 0", 3, 5), ("layer 1", 5, 6), ("layer 2", 6, 8),
                           ("layer 0", 11, 12), ("layer 1", 12, 13), ("layer 2", 13, 14)]


@pytest.mark.parametrize("seed", range(20))
def test_random_valid_calls_always_partition_exactly_and_never_go_negative(seed):
    rng = np.random.default_rng(seed)
    seq = [K.CALL_BEGIN]
    if rng.random() < 0.7:
        seq += [K.VISION_BEGIN, K.VISION_END] * int(rng.integers(1, 3))
    for _ in range(int(rng.integers(1, 3))):
        seq += [K.PREFILL_FORWARD, K.LM_BEGIN, K.LM_HEAD_END]
    n_steps = int(rng.integers(0, 6))
    seq += [K.DECODE_FORWARD] * n_steps + [K.CALL_END]
    t = np.cumsum(rng.integers(0, 10**6, size=len(seq)))
    st = stages_from_marks(np.array([int(k) for k in seq], dtype=np.int32), t)
    parts = [st.vision_ns or 0, st.prefill_ns, st.decode_ns, st.other_ns]
    assert sum(parts) == st.total_ns and min(parts) >= 0
    assert len(st.decode_step_ns) == n_steps and sum(st.decode_step_ns) == st.decode_ns
    assert 0 <= st.ttft_ns <= st.total_ns


def test_overlapping_stages_are_refused_not_reported():
    # vision that ends after the language model started: a wrong layout, not a negative "other"
    lab, t = marks((K.CALL_BEGIN, 0), (K.PREFILL_FORWARD, 1), (K.LM_BEGIN, 2), (K.VISION_BEGIN, 3),
                   (K.VISION_END, 12), (K.LM_HEAD_END, 9), (K.CALL_END, 40))
    with pytest.raises(StageOrderError):
        stages_from_marks(lab, t)


def test_marks_out_of_device_order_are_refused():
    lab, t = marks((K.CALL_BEGIN, 0), (K.PREFILL_FORWARD, 10), (K.LM_BEGIN, 5), (K.CALL_END, 40))
    with pytest.raises(StageOrderError, match="earlier on the device timeline"):
        stages_from_marks(lab, t)


@pytest.mark.parametrize("bad", [
    marks((K.PREFILL_FORWARD, 0), (K.CALL_END, 5)),
    marks((K.CALL_BEGIN, 0), (K.PREFILL_FORWARD, 2)),
    marks((K.CALL_BEGIN, 0), (K.CALL_END, 5)),
    marks((K.CALL_BEGIN, 0), (K.VISION_BEGIN, 1), (K.PREFILL_FORWARD, 2), (K.CALL_END, 5)),
])
def test_incomplete_calls_are_refused(bad):
    with pytest.raises(StageOrderError):
        stages_from_marks(*bad)


def _reference_layers(kinds, idx, t, lo, hi, depth):
    """The loop the vectorized pairing replaced: its executable description."""
    spans, open_at = [], {}
    for p in range(lo, hi):
        if kinds[p] == K.LAYER_BEGIN:
            for i, b in list(open_at.items()):
                spans.append(("layer", i, int(t[b]), int(t[p]), depth))
                del open_at[i]
            open_at[int(idx[p])] = p
        elif kinds[p] == K.LAYER_END and int(idx[p]) in open_at:
            b = open_at.pop(int(idx[p]))
            spans.append(("layer", int(idx[p]), int(t[b]), int(t[p]), depth))
    return spans


@pytest.mark.parametrize("seed", range(30))
def test_vectorized_layer_pairing_equals_the_reference_loop(seed):
    """Random layer marks (pair, shared, nested, unclosed, stray ends) in prefill and steps."""
    rng = np.random.default_rng(seed)
    seq = [(K.CALL_BEGIN, 0), (K.PREFILL_FORWARD, 0), (K.LM_BEGIN, 0)]

    def layer_marks():
        out = []
        for _ in range(int(rng.integers(0, 8))):
            kind = K.LAYER_BEGIN if rng.random() < 0.6 else K.LAYER_END
            out.append((kind, int(rng.integers(0, 3))))
        return out

    seq += layer_marks() + [(K.LM_HEAD_END, 0)]
    for _ in range(int(rng.integers(0, 4))):
        seq += [(K.DECODE_FORWARD, 0)] + layer_marks()
    seq.append((K.CALL_END, 0))
    lab = np.array([label(k, i) for k, i in seq], dtype=np.int32)
    t = np.cumsum(rng.integers(1, 100, size=len(seq)))
    st = stages_from_marks(lab, t)
    kinds, idx = kind_of(lab), index_of(lab)
    decode = list(np.flatnonzero(kinds == K.DECODE_FORWARD))
    first = decode[0] if decode else len(seq) - 1
    want = _reference_layers(kinds, idx, t, 0, first, 2)
    for lo, hi in zip(decode, decode[1:] + [len(seq) - 1]):
        want += _reference_layers(kinds, idx, t, lo, hi, 3)
    got = [(s.kind, s.index, s.start_ns, s.end_ns, s.depth) for s in st.spans if s.kind == "layer"]
    assert got == want


def test_spans_carry_kind_and_index_as_fields():
    lab, t = marks((K.CALL_BEGIN, 0), (K.PREFILL_FORWARD, 1), (K.LM_BEGIN, 2), ((K.LAYER_BEGIN, 4), 3),
                   ((K.LAYER_END, 4), 5), (K.LM_HEAD_END, 9), (K.DECODE_FORWARD, 10), (K.DECODE_FORWARD, 12),
                   (K.CALL_END, 15))
    st = stages_from_marks(lab, t)
    assert [(s.kind, s.index, s.depth) for s in st.spans] == [
        ("call", None, 0), ("prefill", None, 1), ("layer", 4, 2), ("decode", None, 1), ("step", 0, 2),
        ("step", 1, 2)]
    assert [s.name for s in st.spans][-2:] == ["step 0", "step 1"]  # names are for display only


@pytest.mark.parametrize("seed", range(40))
def test_host_spans_are_the_stage_math_run_on_the_host_clock(seed):
    """The spans are decided once, at marks, and both clocks read there: on an ordered host
    clock that equals the stage math run on the host clock alone — ties and nested layers too."""
    rng = np.random.default_rng(seed)
    seq = [(K.CALL_BEGIN, 0), (K.PREFILL_FORWARD, 0)]
    seq += [(K.VISION_BEGIN, 0), (K.VISION_END, 0)] * int(rng.integers(0, 3))
    seq += [(K.LM_BEGIN, 0)] * int(rng.integers(0, 2))
    layers = lambda: [(K.LAYER_BEGIN if rng.random() < 0.6 else K.LAYER_END, int(rng.integers(0, 3)))  # noqa: E731
                      for _ in range(int(rng.integers(0, 6)))]
    seq += layers() + [(K.LM_HEAD_END, 0)] * int(rng.integers(0, 2))
    for _ in range(int(rng.integers(0, 4))):
        seq += [(K.DECODE_FORWARD, 0)] + layers() + [(K.FORWARD_RETURN, 0)]
    seq.append((K.CALL_END, 0))
    lab = np.array([label(k, i) for k, i in seq], dtype=np.int32)
    device = np.cumsum(rng.integers(0, 3, size=len(seq)))  # small steps: many ties
    host = np.cumsum(rng.integers(0, 3, size=len(seq)))
    st = stages_from_marks(lab, device, host)
    assert list(st.spans) == list(stages_from_marks(lab, device).spans)
    assert list(st.host_spans) == list(stages_from_marks(lab, host).spans)
    assert stages_from_marks(lab, device).host_spans == []  # no host clock given: none


def test_host_times_out_of_issue_order_leave_no_host_spans_and_the_stages_stand():
    lab, t = vlm_call()
    host = t.copy()
    host[3], host[4] = host[4], host[3]
    st = stages_from_marks(lab, t, host)
    assert st.host_spans == [] and st.total_ns == 160 and len(st.spans) == 7


def test_after_matmul_flags_ride_in_labels_and_mark_the_layer_spans_they_bound():
    """layer_marks="matmul": a moved stamp keeps its flag; kind and index never see it, and the
    layer spans it starts or ends say so."""
    from stagetrace.labels import AFTER_MATMUL, MAY_MOVE_TO_MATMUL

    lab, t = marks((K.CALL_BEGIN, 0), (K.PREFILL_FORWARD, 1), (K.LM_BEGIN, 2), ((K.LAYER_BEGIN, 0), 3),
                   ((K.LAYER_BEGIN, 1), 5), ((K.LAYER_END, 1), 8), (K.LM_HEAD_END, 9), (K.DECODE_FORWARD, 10),
                   ((K.LAYER_BEGIN, 0), 11), ((K.LAYER_BEGIN, 1), 12), ((K.LAYER_END, 1), 14), (K.CALL_END, 15))
    flagged = lab.copy()
    flagged[9] |= AFTER_MATMUL     # the boundary stamp between layers 0 and 1 of the step moved
    flagged[10] |= AFTER_MATMUL
    flagged[8] |= MAY_MOVE_TO_MATMUL  # one the pass left at its boundary
    assert kind_of(flagged).tolist() == kind_of(lab).tolist()
    assert index_of(flagged).tolist() == index_of(lab).tolist()
    plain, moved = stages_from_marks(lab, t), stages_from_marks(flagged, t, t)
    strip = lambda spans: [(s.kind, s.index, s.start_ns, s.end_ns, s.depth) for s in spans]  # noqa: E731
    assert strip(moved.spans) == strip(plain.spans) and moved.total_ns == plain.total_ns
    flags = [(s.index, s.depth, s.starts_after_matmul, s.ends_after_matmul) for s in moved.spans if s.kind == "layer"]
    assert flags == [(0, 2, False, False), (1, 2, False, False), (0, 3, False, True), (1, 3, True, True)]
    assert [(s.starts_after_matmul, s.ends_after_matmul) for s in moved.host_spans] == \
        [(s.starts_after_matmul, s.ends_after_matmul) for s in moved.spans]
    assert not any(s.starts_after_matmul or s.ends_after_matmul for s in plain.spans)


def _random_marks(rng):
    """Any sequence: valid calls, broken frames, unpaired vision, stray and nested layer marks,
    flags; times with ties and, sometimes, out of order."""
    from stagetrace.labels import AFTER_MATMUL, MAY_MOVE_TO_MATMUL

    kinds = [K.VISION_BEGIN, K.VISION_END, K.PREFILL_FORWARD, K.LM_BEGIN, K.LM_HEAD_END, K.LAYER_BEGIN,
             K.LAYER_END, K.DECODE_FORWARD, K.FORWARD_RETURN]
    weights = np.array([1, 1, 2, 2, 2, 4, 3, 3, 2], dtype=float)
    inner = rng.choice(len(kinds), size=int(rng.integers(0, 40)), p=weights / weights.sum())
    seq = [label(K.CALL_BEGIN)] + [label(kinds[k], int(rng.integers(0, 4))) for k in inner] + [label(K.CALL_END)]
    if rng.random() < 0.05:
        seq = seq[1:] if rng.random() < 0.5 else seq[:-1]
    lab = np.array(seq, dtype=np.int32)
    flagged = rng.random(len(lab)) < 0.1
    lab[flagged] |= AFTER_MATMUL if rng.random() < 0.5 else MAY_MOVE_TO_MATMUL
    t = np.cumsum(rng.integers(0, 3, size=len(lab))).astype(np.int64)
    if rng.random() < 0.1 and len(t) > 2:
        t[int(rng.integers(1, len(t)))] -= 5
    return lab, t


@pytest.mark.skipif(stages_module._native_rows is None, reason="the native extension did not build")
def test_the_native_walk_over_the_marks_equals_the_numpy_reference():
    """csrc/stage_rows.cpp and stages._bounds_numpy: the same stage boundaries, the same span
    rows, and the same refusal with the same words, on 5,000 random sequences."""
    rng = np.random.default_rng(7)
    outcomes = set()
    for _ in range(5000):
        lab, t = _random_marks(rng)
        try:
            want = stages_module._bounds_numpy(lab, t)
        except StageOrderError as exc:
            with pytest.raises(StageOrderError) as got:
                stages_module._bounds_native(lab, t)
            assert str(got.value) == str(exc)
            outcomes.add(str(exc).split(" ")[0])
            continue
        got = stages_module._bounds_native(lab, t)
        assert (got.vision, got.prefill, got.first_decode) == (want.vision, want.prefill, want.first_decode)
        assert got.step_bounds.tolist() == want.step_bounds.tolist()
        for col in ("kind", "index", "depth", "begin", "end"):
            assert getattr(got.rows, col).tolist() == getattr(want.rows, col).tolist(), (col, lab, t)
        outcomes.add("ok")
    assert outcomes >= {"ok", "a", "mark", "vision", "no"}, outcomes  # every kind of refusal was met


def test_the_native_kind_codes_are_the_labels_and_span_kinds():
    from stagetrace.low_level import _C
    from stagetrace.spans import KIND_CODE

    if not hasattr(_C, "stage_kind_codes"):
        pytest.skip("the native extension did not build")
    marks, spans = _C.stage_kind_codes()
    assert marks == {k.name: int(k) for k in K} and spans == KIND_CODE
