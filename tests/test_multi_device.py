"""A model split over several GPUs: every mark on every device, one clock from a calibration.

The arithmetic is checked on synthetic clocks; the ``gpu`` tests at the end need two GPUs
(they skip with the reason otherwise) and check known cross-device work and a real split.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import stagetrace
from stagetrace.export.chrome import chrome_trace
from stagetrace.labels import Kind, index_of, kind_of, label, layer_labels
from stagetrace.low_level.clocks import COMPANION
from stagetrace.low_level.multi_device import MultiDeviceTimeline
from stagetrace.low_level.pytimeline import TimelineError
from stagetrace.records import StageRecord
from stagetrace.spans import Span

from helpers import assert_partition, gen_kwargs, tokens

_HOST_CLOCK = itertools.count(1_000, 1)  # one host clock for every fake device: issue order
L = [label(Kind.CALL_BEGIN), label(Kind.PREFILL_FORWARD), label(Kind.LM_BEGIN), label(Kind.CALL_END)]


class _FakeDeviceTimeline:
    """A device timeline on a synthetic clock that starts ``lag_ns`` behind the host."""

    def __init__(self, device, busy_ns):
        self.device, self.busy_ns = device, busy_ns
        self.calls: list[str] = []
        self.labels: list[int] = []
        self.host: list[int] = []
        self.dropped = 0
        self.bound_stream = 0

    def mark(self, lab):
        self.labels.append(lab)
        self.host.append(next(_HOST_CLOCK))

    def bind_stream(self, s):
        self.bound_stream = s
        self.calls.append(f"bind {s}")

    def synchronize_device(self):
        self.calls.append("sync")

    def reset(self):
        self.labels.clear()
        self.host.clear()
        self.calls.append("reset")

    def resolve(self):
        n = len(self.labels)
        return (np.asarray(self.labels, np.int32), np.arange(n, dtype=np.int64) * self.busy_ns,
                np.asarray(self.host, np.int64), np.full(n, self.bound_stream, np.int64))

    def __len__(self):
        return len(self.labels)


def test_the_multi_device_timeline_marks_every_device_and_calibrates_before_the_call():
    a, b = _FakeDeviceTimeline(0, busy_ns=100), _FakeDeviceTimeline(1, busy_ns=300)
    tl = MultiDeviceTimeline([a, b])
    tl.reset()
    tl.bind_streams([11, 22])
    tl.calibrate()
    for lab in L:
        tl.mark(lab)
    assert a.labels == L and b.labels == [lab | COMPANION for lab in L] and len(tl) == 4 and tl.events == 8
    assert a.calls == ["reset", "bind 11", "sync"] and b.calls == ["reset", "bind 22", "sync"]
    labels, t, _, streams = tl.resolve()
    assert labels.tolist() == L
    assert t.tolist() == [0, 301, 601, 901] and tl.mark_devices.tolist() == [0, 1, 1, 1]  # b: 1 ns later, busier
    assert streams.tolist() == [11] * 4
    with pytest.raises(ValueError, match="2 streams for 2 devices|3 streams for 2 devices"):
        tl.bind_streams([1, 2, 3])
    with pytest.raises(TimelineError, match="mark_on"):
        tl.mark_on(1, 2)


def test_a_split_models_chrome_trace_has_one_gpu_track_per_device():
    spans = [Span("call", None, 0, 10_000, 0, "cuda:0"), Span("prefill", None, 0, 8_000, 1, "cuda:0"),
             Span("layer", 0, 0, 3_000, 2, "cuda:0"), Span("layer", 1, 3_000, 7_000, 2, "cuda:1"),
             Span("decode", None, 8_000, 10_000, 1, "cuda:0")]
    rec = StageRecord(total_ms=0.01, vision_ms=None, prefill_ms=0.008, decode_ms=0.002, other_ms=0.0,
                      ttft_ms=0.008, decode_step_ms=[0.002], batch_size=1, prompt_tokens=4, output_tokens=2,
                      device="cuda:0", backend="cuda", stream=0x10, devices=["cuda:0", "cuda:1"],
                      device_streams=[0x10, 0x20], spans=spans, unix_start=1.0)
    trace = chrome_trace([rec])
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}
    by_track = {}
    for e in trace["traceEvents"]:
        if e["ph"] == "X" and e["cat"] != "host":
            by_track.setdefault(names[e["tid"]], []).append(e["name"])
    assert by_track == {"GPU cuda:0 stream 0x10": ["generate", "prefill", "layer 0", "decode"],
                        "GPU cuda:1 stream 0x20": ["layer 1"]}
    back = StageRecord.from_dict(rec.to_dict(spans=True))
    assert back.devices == rec.devices and back.spans == spans


@pytest.mark.parametrize("family", ["llava", "llama"])
def test_split_over_gpus_maps_every_weight_once_second_half_to_the_second_device(family):
    from stagetrace.testing import checkpoints, tiny

    case = tiny.build(family)
    model = checkpoints.split_over_gpus(case.model, devices=("cpu", "cpu"))  # the map itself, on CPU
    dm = model.hf_device_map
    lay = stagetrace.trace(model).layout
    second = {lay.layers[-1][0], lay.lm_head[0], f"{lay.language_model[0]}.norm"}
    assert second <= set(dm) and lay.layers[0][0] in dm
    names = [n for n, _ in [*model.named_parameters(), *model.named_buffers()]]
    owners = [[k for k in dm if n == k or n.startswith(k + ".") or not k] for n in names]
    assert all(len(o) == 1 for o in owners), [(n, o) for n, o in zip(names, owners) if len(o) != 1]
    assert tokens(model.generate(**gen_kwargs(case, 2))).shape[1] == case.prompt_len + 2


@pytest.mark.parametrize("layer_marks", ["pair", "shared"])
def test_a_split_model_records_each_layer_mark_once_on_the_gpu_whose_work_it_waits_for(monkeypatch, layer_marks):
    """Host clocks stand in for two GPUs (layer 0 on the first, layer 1 on the second): which
    device gets which record is what the tracer decides; the GPU tests check the times."""
    from stagetrace.low_level.pytimeline import PyHostTimeline
    from stagetrace.testing import tiny
    from stagetrace.tracing.devices import SpanPlacement

    case = tiny.build("llama")
    n = len(stagetrace.trace(case.model).layout.layers)
    on = np.asarray([0] * (n // 2) + [1] * (n - n // 2), np.int16)  # first half on GPU 0, the rest on GPU 1
    monkeypatch.setattr(SpanPlacement, "of", classmethod(lambda cls, layout, devices: cls(("cuda:0", "cuda:1"), on, 0)))
    class Seen(PyHostTimeline):
        def mark(self, lab):
            self.seen.append(lab)
            super().mark(lab)

    per_mode = {}
    for every in (False, True):
        a, b = Seen(), Seen()
        a.seen, b.seen = [], []
        tl = MultiDeviceTimeline([a, b], mark_every_device=every)
        with stagetrace.trace(case.model, layer_detail="all", layer_marks=layer_marks, timeline=tl) as tracer:
            tracer.model.generate(**gen_kwargs(case, 3))
        (rec,) = tracer.records
        assert_partition(rec)
        own_b = [x for x in b.seen if not x & COMPANION]  # what only GPU 1 recorded
        per_mode[every] = (rec, own_b, len(tl), tl.events)
    (one, own_b, marks, events), (every, own_b_every, marks_every, events_every) = per_mode[False], per_mode[True]
    assert own_b_every == [] and events_every == 2 * marks_every  # before: each mark on both GPUs
    # now: a layer's end on its GPU, a layer's begin on the previous layer's GPU, so GPU 1 alone
    # records the begins of its layers after its first and the ends of all its layers
    forwards = 3  # the prefill and two decode steps
    ends = [label(Kind.LAYER_END, i) for i in range(n) if on[i] == 1 and (layer_marks == "pair" or i == n - 1)]
    begins = [label(Kind.LAYER_BEGIN, i) for i in range(1, n) if on[i - 1] == 1]
    per_forward = sorted(begins + ends)
    assert sorted(own_b) == sorted(per_forward * forwards)
    assert marks == marks_every and events < events_every
    layer_marks_per_forward = sum(1 + (end is not None) for _, end in layer_labels(n, layer_marks))
    stage_marks = marks - forwards * layer_marks_per_forward
    assert events == marks + stage_marks + forwards  # stage marks and each first layer's begin: on both
    # the same spans, each on the GPU holding its layer
    assert [(s.name, s.device) for s in one.spans] == [(s.name, s.device) for s in every.spans]
    assert {s.device for s in one.spans if s.name == f"layer {n - 1}"} == {"cuda:1"}


def test_a_layers_begin_mark_is_issued_before_accelerate_moves_its_inputs():
    """Why a layer's begin waits only for the previous layer's GPU: with ``device_map``,
    accelerate moves the hidden states inside the layer's (patched) forward, after the mark."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from stagetrace.low_level.pytimeline import PyHostTimeline
    from stagetrace.testing import tiny

    case = tiny.build("llama")
    layers = [m for _, m in stagetrace.trace(case.model).layout.layers]
    order: list[tuple[str, int]] = []

    class SeenMove(AlignDevicesHook):
        def pre_forward(self, module, *args, **kwargs):
            order.append(("move", next(i for i, m in enumerate(layers) if m is module)))
            return super().pre_forward(module, *args, **kwargs)

    class SeenMarks(PyHostTimeline):
        def mark(self, lab):
            kind = Kind(int(kind_of(lab)))
            if kind in (Kind.LAYER_BEGIN, Kind.LAYER_END):
                order.append((kind.name, int(index_of(lab))))
            super().mark(lab)

    for layer in layers:  # as dispatch_model does for a module on a GPU
        add_hook_to_module(layer, SeenMove(execution_device="cpu"))
    with stagetrace.trace(case.model, layer_detail="all", timeline=SeenMarks()):
        case.model.generate(**gen_kwargs(case, 2))
    assert len(layers) >= 2  # the hand-over between two layers is what is checked
    expect = [x for i in range(len(layers)) for x in (("LAYER_BEGIN", i), ("move", i), ("LAYER_END", i))]
    assert order == expect * 2, order  # the prefill and one decode step


# ---------------------------------------------------------------- two GPUs
def _two_gpus() -> None:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two GPUs; torch sees {torch.cuda.device_count()}")


@pytest.mark.gpu
def test_work_handed_from_one_gpu_to_the_other_is_timed_on_one_clock():
    """d0 spins 2 ms, d1 waits for it and spins 1 ms: each interval lands on the device that did it."""
    from stagetrace.low_level import _C
    from stagetrace.testing.reference import gpu_handover, spin_cycles_per_us

    _two_gpus()
    cycles = spin_cycles_per_us()
    tl = MultiDeviceTimeline([_C.CudaTimeline(0), _C.CudaTimeline(1)])
    errors_us = []
    for rep in range(12):
        h = gpu_handover(tl, cycles)
        if rep < 2:
            continue  # the second card may still be clocking up
        t, which = h["t_ns"], h["which"]
        assert which[1] == 0 and which[3] == 1  # d0's spin bounds mark 1, d1's spin mark 3
        assert t[1] / 1e3 >= 2000 * 0.98, t
        # GPU 1's interval against its own reference pair
        assert abs((t[3] - t[2]) / 1e3 - h["second_ref_us"]) <= 0.01 * h["second_ref_us"] + 5, h
        # d1 starts once d0 has finished: on one clock, its start is at or just after d0's end
        errors_us.append(h["handover_us"])
    assert -20 <= min(errors_us) and max(errors_us) <= 50, errors_us


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llava", "llama"])
def test_a_model_split_over_two_gpus_is_traced_on_each(family):
    from stagetrace.low_level import _C
    from stagetrace.testing import checkpoints, tiny
    from stagetrace.testing.reference import spin_cycles_per_us

    _two_gpus()
    case = tiny.build(family)
    case.model = checkpoints.split_over_gpus(case.model)
    case.inputs = {k: v.to("cuda:0") if isinstance(v, torch.Tensor) else v for k, v in case.inputs.items()}
    kw = gen_kwargs(case, 4)
    plain = tokens(case.model.generate(**kw))
    with stagetrace.trace(case.model, layer_detail="all") as tracer:
        traced = tokens(case.model.generate(**kw))
    assert torch.equal(plain, traced)
    (rec,) = tracer.records
    assert_partition(rec)
    assert rec.device == "cuda:0" and rec.devices == ["cuda:0", "cuda:1"] and len(rec.device_streams) == 2
    layers = {s.device for s in rec.spans if s.name == "layer 1"}
    assert layers == {"cuda:1"} and {s.device for s in rec.spans if s.name == "layer 0"} == {"cuda:0"}

    # 3 ms of work on the second card inside layer 1 (in its MLP) during the prefill is found there
    cycles = spin_cycles_per_us()
    layer1 = tracer.layout.layers[1][1]

    def spin_on_second_card(module, args, output):
        if output.shape[1] > 1:  # the prefill
            with torch.cuda.device(1):
                torch.cuda._sleep(int(3000 * cycles))

    def spin_on_first_card(module, args, output):
        if output.shape[1] > 1:
            with torch.cuda.device(0):
                torch.cuda._sleep(int(3000 * cycles))

    def prefill_layer_ms(timeline, module, hook):
        handle = module.register_forward_hook(hook)
        try:
            with stagetrace.trace(case.model, layer_detail="prefill", timeline=timeline) as tracer:
                case.model.generate(**kw)
        finally:
            handle.remove()
        rec = tracer.records[0]
        assert_partition(rec)
        # the GPU's span, and the host's time issuing it: a span can outlast its GPU work by at
        # most the host's own time (a tiny model is host-bound: the GPU waits for each launch;
        # recording every mark on both cards adds a device switch per mark on the host)
        return ({s.name: s.dur_ns / 1e6 for s in rec.spans if s.name.startswith("layer")},
                {s.name: s.dur_ns / 1e6 for s in rec.host_spans if s.name.startswith("layer")})

    # each way of recording: one event per layer mark on its GPU (the default), every mark on both
    for every_device in (False, True):
        timeline = MultiDeviceTimeline([_C.CudaTimeline(0), _C.CudaTimeline(1)], mark_every_device=every_device)
        layer_ms, host_ms = prefill_layer_ms(timeline, layer1.mlp, spin_on_second_card)
        why = (every_device, layer_ms, host_ms)
        assert 3.0 <= layer_ms["layer 1"] <= 3.0 + host_ms["layer 1"] + 1.0, why
        # 3 ms at the end of layer 0 on the first card: layer 1's begin (recorded there) waits for it
        layer_ms, host_ms = prefill_layer_ms(timeline, tracer.layout.layers[0][1].mlp, spin_on_first_card)
        why = (every_device, layer_ms, host_ms)
        assert 3.0 <= layer_ms["layer 0"] <= 3.0 + host_ms["layer 0"] + 1.0, why
        assert layer_ms["layer 1"] < host_ms["layer 1"] + 1.0, why
        events = timeline.events
        assert (events == 2 * len(timeline)) == every_device, (events, len(timeline))


@pytest.mark.gpu
def test_a_model_on_the_second_gpu_is_traced_while_the_first_is_current():
    """torch's default stream handle (0) means the *current* device's: marks must still land on cuda:1."""
    from stagetrace.testing import tiny

    _two_gpus()
    case = tiny.build("llava")
    case.model.to("cuda:1")
    case.inputs = {k: v.to("cuda:1") if isinstance(v, torch.Tensor) else v for k, v in case.inputs.items()}
    assert torch.cuda.current_device() == 0
    kw = gen_kwargs(case, 3)
    plain = tokens(case.model.generate(**kw))
    with stagetrace.trace(case.model) as tracer:
        assert torch.equal(tokens(case.model.generate(**kw)), plain)
    rec = tracer.records[0]
    assert_partition(rec)
    assert rec.device == "cuda:1" and rec.devices == []
