"""The allreduce strategy is the DDP-equivalent baseline: same seeds, same parameters as DDP."""

from __future__ import annotations

import pytest
import torch

import jobs
import tandem
from tandem.launch import spawn


def test_allreduce_equals_torch_ddp(tmp_path):
    cfg = {
        "workload": {"name": "digits"},
        "strategy": "allreduce",
        "codec": "dense",
        "workers": 2,
        "steps": 20,
        "batch_size": 16,
        "lr": 0.1,
        "momentum": 0.9,
        "seed": 3,
        "progress": False,
        "out": str(tmp_path / "run"),
    }
    summary = tandem.train(cfg, return_results=True)
    ours = summary["results"][0]["params"]
    # both ranks hold the same model
    for a, b in zip(ours, summary["results"][1]["params"], strict=True):
        assert torch.equal(a, b)
    full = tandem.load_config(cfg).model_dump(mode="json")
    ddp = spawn(jobs.ddp_reference, 2, full, timeout_s=120)[0]
    for a, b in zip(ours, ddp, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # training actually moved the parameters away from their initial values
    from tandem.trainer import build_model
    from tandem.workloads import build_workload

    init = list(build_model(build_workload(tandem.load_config(cfg).workload, 3), 3).parameters())
    moved = max(
        float((a - b).abs().max()) for a, b in zip(ours, [p.detach() for p in init], strict=True)
    )
    assert summary["steps"] == 20 and moved > 1e-3


def test_run_record_is_complete(tmp_path):
    out = tmp_path / "rec"
    summary = tandem.train(
        {
            "workload": {"name": "digits"},
            "workers": 2,
            "steps": 30,
            "lr": 0.1,
            "progress": False,
            "out": str(out),
            "target_accuracy": 0.5,
            "net": "1gbit:100us",
        }
    )
    for name in ("config.yaml", "events.jsonl", "summary.json", "curves.png"):
        assert (out / name).is_file(), name
    for key in (
        "strategy",
        "codec",
        "workers",
        "steps",
        "wall_time_s",
        "final_test_accuracy",
        "final_test_loss",
        "bytes_sent_total",
        "bytes_sent_per_worker_per_step",
        "compute_fraction",
        "comm_fraction",
        "idle_fraction",
        "time_to_target_s",
    ):
        assert key in summary, key
    # dense digits MLP: 64*128+128+128*10+10 = 9610 floats; ring all-reduce at N=2 sends s each way
    assert summary["bytes_sent_per_worker_per_step"] == 9610 * 4
    assert summary["final_test_accuracy"] > 0.5
    lines = (out / "events.jsonl").read_text().splitlines()
    assert sum('"kind": "step"' in ln or '"kind":"step"' in ln for ln in lines) == 2 * 30


def test_flat_gradients_are_reused_and_sent_without_a_copy():
    """use_flat_gradients: backward adds into one buffer (no new gradient tensors per step),
    and the dense codec recognises the tiled buffer while a gap or a reordering defeats it."""
    from tandem.flat import contiguous_span

    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    params = list(model.parameters())
    flat = torch.zeros(sum(p.numel() for p in params))
    views, offset = [], 0
    for p in params:
        views.append(flat[offset: offset + p.numel()].view_as(p))
        p.grad = views[-1]
        offset += p.numel()
    ref = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    ref.load_state_dict(model.state_dict())
    x = torch.randn(4, 6)
    model(x).sum().backward()
    ref(x).sum().backward()
    for p, r, v in zip(params, ref.parameters(), views, strict=True):
        assert p.grad.data_ptr() == v.data_ptr()  # accumulated in place, not replaced
        torch.testing.assert_close(p.grad, r.grad, rtol=0, atol=0)
    grads = [p.grad.detach() for p in params]
    span = contiguous_span(grads)
    assert span is not None and span.data_ptr() == flat.data_ptr() and span.numel() == flat.numel()
    assert contiguous_span(grads[::-1]) is None
    assert contiguous_span([grads[0], grads[2]]) is None  # a gap
    assert contiguous_span([g.clone() for g in grads]) is None


class _FakeTransport:
    """Rank 0 of 2 whose peer sends what we send; records the order of all-reduces."""

    rank, world = 0, 2

    def __init__(self):
        self.launched = []

    def all_reduce(self, t, op="sum", *, group=None, category="train"):
        self.launched.append(t.numel())
        t.mul_(2)

        class Done:
            def wait(self, timeout=None):
                return t
        return Done()


class _FlatTrainer:
    def __init__(self, model):
        self.params = list(model.parameters())
        self.flat_grad = torch.zeros(sum(p.numel() for p in self.params))
        self._grad_views, offset = [], 0
        for p in self.params:
            self._grad_views.append(self.flat_grad[offset: offset + p.numel()].view_as(p))
            p.grad = self._grad_views[-1]
            offset += p.numel()


def test_overlap_launches_buckets_during_backward_in_order_and_screens_them():
    from tandem.errors import NonFiniteGradient
    from tandem.strategies.allreduce.buckets import BucketedAllReduce, plan_buckets

    assert plan_buckets([400, 16, 12800, 32, 32768, 64, 640, 10], 64 * 1024) == \
        [(13248, 46730), (0, 13248)]
    assert plan_buckets([3, 5], 10**9) == [(0, 8)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                torch.nn.Tanh(), torch.nn.Linear(64, 4))
    trainer, transport = _FlatTrainer(model), _FakeTransport()
    seen_at_first_layer = []
    first = model[0].weight
    first.register_post_accumulate_grad_hook(lambda p: seen_at_first_layer.append(
        list(transport.launched)))
    overlap = BucketedAllReduce(trainer, transport, bucket_bytes=64 * 65 * 4)
    assert overlap.count == 2
    x = torch.randn(5, 8)
    ref = [g.clone() for g in torch.autograd.grad(model(x).sum(), list(model.parameters()))]
    trainer.flat_grad.zero_()
    overlap.arm(step=3)
    model(x).sum().backward()
    # the tail bucket (last two layers) was on the wire before backward reached the first layer
    assert seen_at_first_layer == [[64 * 64 + 64 + 4 * 64 + 4]]
    mean = overlap.finish()
    assert transport.launched == [64 * 64 + 64 + 4 * 64 + 4, 8 * 64 + 64]
    for m, r in zip(mean, ref, strict=True):
        torch.testing.assert_close(m, r, rtol=0, atol=0)  # (g + g) / 2 == g exactly
    trainer.flat_grad.zero_()
    overlap.arm(step=7)
    with pytest.raises(NonFiniteGradient, match="step 7"):
        model(x * float("nan")).sum().backward()


def test_overlap_on_and_off_give_identical_parameters(tmp_path):
    base = {"workload": {"name": "digits"}, "workers": 2, "steps": 12,
            "batch_size": 16, "lr": 0.1, "momentum": 0.9, "seed": 5, "progress": False}
    runs = {}
    for overlap in (True, False):
        cfg = {**base, "out": str(tmp_path / f"o{overlap}"),
               "strategy": {"name": "allreduce",
                            "options": {"overlap": overlap, "bucket_kb": 4}}}
        runs[overlap] = tandem.train(cfg, return_results=True)
    on, off = (runs[k]["results"][0]["params"] for k in (True, False))
    for a, b in zip(on, off, strict=True):
        assert torch.equal(a, b)
    assert runs[True]["bytes_sent_total"] == runs[False]["bytes_sent_total"]
    import json

    info = json.loads((tmp_path / "oTrue" / "summary.json").read_text())
    assert "overlap_buckets" in json.dumps(info)
    assert "overlap_buckets" not in (tmp_path / "oFalse" / "summary.json").read_text()
