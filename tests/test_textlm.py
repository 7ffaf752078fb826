"""textlm: byte windows, the block split, the transformer, the AdamW/cosine recipes, a short run."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from tandem.config import WorkloadConfig
from tandem.errors import ConfigError, DataError
from tandem.workloads import WORKLOADS, Workload, build_workload
from tandem.workloads import textlm as textlm_mod
from tandem.workloads.metrics import sequence_cross_entropy, token_accuracy
from tandem.workloads.recipes import WarmupCosine, adamw_groups, decay_groups, warmup_cosine
from tandem.workloads.transformer import TinyGPT, parameter_count

LN256 = math.log(256)
SMALL = {"max_bytes": 200_000, "d_model": 64, "layers": 2, "heads": 2, "test_windows": 64}


def textlm(**options: object) -> Workload:
    return build_workload(WorkloadConfig(name="textlm", options=options), seed=0)


@pytest.fixture(scope="module")
def default() -> Workload:
    return textlm()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- data ------------------------------------------------------------------------------------

def test_registered_with_the_contract(default: Workload) -> None:
    assert "textlm" in WORKLOADS.names()
    assert default.task == "language" and default.loss_fn is sequence_cross_entropy
    assert default.metrics == {"accuracy": token_accuracy}
    assert default.optimizer is adamw_groups and default.scheduler is warmup_cosine
    assert default.clip_grad_norm == 1.0 and default.defaults["lr"] > 0
    assert default.meta["corpus"] == "stdlib" and default.meta["corpus_bytes"] == 2_000_000
    assert default.meta["context"] == 64
    # everything a worker process receives pickles (by reference: no lambdas, no closures)
    pickle.dumps((default.model_fn, default.optimizer, default.scheduler, default.loss_fn,
                  default.metrics))


def test_windows_are_next_byte_pairs_of_the_corpus(tmp_path) -> None:
    text = bytes(range(256)) * 40 + b"the end"  # 10247 bytes
    path = tmp_path / "corpus.txt"
    path.write_bytes(text)
    wl = textlm(corpus=str(path), context=16, test_windows=32)
    x, y = textlm_mod.make_windows(text, 16)
    assert len(x) == len(text) // 17 and x.dtype == y.dtype == torch.int64
    for i in (0, 1, len(x) - 1):
        window = torch.tensor(list(text[i * 17:(i + 1) * 17]))
        assert torch.equal(x[i], window[:-1]) and torch.equal(y[i], window[1:])
    # the workload's train and test rows are exactly those windows, split by split_blocks
    train_idx, test_idx = textlm_mod.split_blocks(len(x), 32)
    assert torch.equal(wl.train.x, x[train_idx]) and torch.equal(wl.train.y, y[train_idx])
    assert torch.equal(wl.test.x, x[test_idx]) and torch.equal(wl.test.y, y[test_idx])
    assert wl.meta["corpus"] == "file" and wl.meta["corpus_bytes"] == len(text)


def test_stdlib_corpus_is_deterministic_and_capped(default: Workload) -> None:
    data, _ = textlm_mod.stdlib_corpus(300_000)
    again, _ = textlm_mod.stdlib_corpus(300_000)
    assert data == again and len(data) == 300_000
    assert data.startswith(textlm_mod.stdlib_corpus(1000)[0])  # a prefix of the same order
    assert b"def " in data and b"import " in data
    x, y = default.train[:4]
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one byte


def test_split_is_disjoint_blocks_spread_over_the_corpus() -> None:
    n = 10_000
    train, test = textlm_mod.split_blocks(n, 256)
    assert len(test) == 256 and len(train) + len(test) == n
    assert not set(train.tolist()) & set(test.tolist())
    assert torch.equal(torch.sort(torch.cat([train, test])).values, torch.arange(n))
    runs = torch.tensor_split(test, 256 // textlm_mod.TEST_BLOCK)  # 8 blocks of 32
    for run in runs:
        assert torch.equal(run, torch.arange(int(run[0]), int(run[0]) + textlm_mod.TEST_BLOCK))
    starts = [int(r[0]) for r in runs]
    assert starts[0] < n // 8 and starts[-1] > n * 7 // 8  # spread, not all at one end
    # a count that is not a whole number of blocks, and a corpus too small for the request
    assert len(textlm_mod.split_blocks(1000, 40)[1]) == 40
    assert len(textlm_mod.split_blocks(50, 10)[1]) == 10
    with pytest.raises(DataError, match="raise max_bytes"):
        textlm_mod.split_blocks(100, 60)


def test_data_path_names_the_corpus(tmp_path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(b"hello world. " * 2000)
    cfg = WorkloadConfig(name="textlm", data_path=path, options={"test_windows": 16})
    assert build_workload(cfg).meta["corpus_source"] == str(path.resolve())
    both = WorkloadConfig(name="textlm", data_path=path, options={"corpus": "stdlib"})
    with pytest.raises(ConfigError, match="give one"):
        build_workload(both)
    with pytest.raises(DataError, match="not found.*stdlib, kjv"):
        textlm(corpus=str(tmp_path / "missing.txt"))


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"unknown option 'width'.*Allowed options: .*context"):
        textlm(width=3)
    with pytest.raises(ConfigError, match="multiple of heads"):
        textlm(d_model=100, heads=3)
    with pytest.raises(ConfigError, match="context"):
        textlm(context=1)


def test_kjv_missing_says_how_to_install() -> None:
    if textlm_mod._kjv_data_dir() is not None and textlm_mod._kjv_reader() is not None:
        pytest.skip("bible-kjv-text is installed here")
    with pytest.raises(DataError, match=r"make bench-data.*apt-get install bible-kjv-text"):
        textlm(corpus="kjv")


# ---- model -----------------------------------------------------------------------------------

def test_parameter_count_matches_the_docstring_and_scales(default: Workload) -> None:
    torch.manual_seed(0)
    model = default.model_fn()
    assert n_params(model) == 867_072 == default.meta["parameters"]
    assert "867,072" in (textlm_mod.__doc__ or "")
    for opts in ({"d_model": 64, "layers": 2, "heads": 2}, {"tie_weights": True},
                 {"d_model": 192, "layers": 6, "context": 128}):
        wl = textlm(max_bytes=100_000, test_windows=16, **opts)
        count = n_params(wl.model_fn())
        assert count == wl.meta["parameters"] == parameter_count(
            opts.get("d_model", 128), opts.get("layers", 4), opts.get("context", 64),
            bool(opts.get("tie_weights", False)))
    assert parameter_count(128, 4, 64, tie_weights=True) == 834_304
    assert parameter_count(256, 12, 128) < 10_000_000 < parameter_count(320, 12, 128)


def test_fresh_model_loss_is_near_uniform(default: Workload) -> None:
    torch.manual_seed(0)
    model = default.model_fn()
    x, y = default.train[:16]
    with torch.no_grad():
        out = model(x)
    assert out.shape == (16, 64, 256)
    assert abs(default.loss_fn(out, y).item() - LN256) < 0.1


def test_attention_is_causal() -> None:
    torch.manual_seed(0)
    model = TinyGPT(context=32, d_model=32, layers=2, heads=4).eval()
    idx = torch.randint(0, 256, (3, 32))
    changed = idx.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 256
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])
    with torch.no_grad():  # shorter inputs work; longer than the context do not
        assert torch.allclose(model(idx[:, :10]), a[:, :10], atol=1e-5)
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 33, dtype=torch.long))
    out = model.generate(idx[0, :5], 6, temperature=0)
    assert out.shape == (11,) and torch.equal(out[:5], idx[0, :5])


# ---- recipes ---------------------------------------------------------------------------------

def test_adamw_groups_decay_matrices_only() -> None:
    model = TinyGPT(context=8, d_model=16, layers=1, heads=2, tie_weights=True)
    opt = adamw_groups(model, lr=1e-3)
    decay, other = opt.param_groups
    assert decay["weight_decay"] == 0.1 and other["weight_decay"] == 0.0
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["betas"] == (0.9, 0.95)
    decayed = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                     "blocks.0.mlp.fc.weight", "blocks.0.mlp.out.weight"}
    # every trainable parameter is in exactly one group; the tied embedding once, undecayed
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert id(model.tok_emb.weight) in {id(p) for p in other["params"]}
    model.ln_f.weight.requires_grad_(False)
    assert sum(len(g["params"]) for g in decay_groups(model, 0.1)) == len(ids) - 1


def test_warmup_cosine_shape_and_state() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = warmup_cosine(opt, total_steps=100, warmup_fraction=0.1, min_ratio=0.1)
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2) and lrs[9] == pytest.approx(2.0)  # 10 warm-up steps
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101], strict=True))
    assert lrs[55] == pytest.approx(0.2 + 1.8 * 0.5)  # half way through the cosine
    assert lrs[100] == pytest.approx(0.2) and lrs[119] == pytest.approx(0.2)
    state = pickle.loads(pickle.dumps(sched.state_dict()))
    again = warmup_cosine(torch.optim.SGD([p], lr=2.0), 5)
    again.load_state_dict(state)
    assert isinstance(again.lr_lambdas[0], WarmupCosine) and again.lr_lambdas[0].total_steps == 100
    assert warmup_cosine(torch.optim.SGD([p], lr=1.0), 10, warmup_fraction=0).lr_lambdas[0](0) == 1
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine(opt, 0)


# ---- training --------------------------------------------------------------------------------

def test_short_training_run_learns_bytes() -> None:
    """60 single-process steps with the workload's own recipe lower the test loss well below
    ln 256 (measured 2.82 nats/byte; the bound, 4.05, leaves a wide margin). Depends on steps
    only, not on the machine's speed."""
    torch.set_num_threads(1)
    wl = textlm(**SMALL)
    torch.manual_seed(0)
    model = wl.model_fn()
    steps = 60
    opt = wl.optimizer(model, lr=wl.defaults["lr"])  # type: ignore[misc, call-arg]
    sched = wl.scheduler(opt, steps)  # type: ignore[misc]
    gen = torch.Generator().manual_seed(0)

    def test_loss() -> float:
        model.eval()
        with torch.no_grad():
            x, y = wl.test[:]
            loss = wl.loss_fn(model(x), y).item()
        model.train()
        return loss

    before = test_loss()
    for _ in range(steps):
        x, y = wl.train[torch.randint(0, len(wl.train), (wl.defaults["batch_size"],),
                                      generator=gen)]
        opt.zero_grad()
        wl.loss_fn(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), wl.clip_grad_norm)
        opt.step()
        sched.step()
    after = test_loss()
    assert abs(before - LN256) < 0.1
    assert after < LN256 - 1.5, f"test loss {after:.3f} after {steps} steps"
