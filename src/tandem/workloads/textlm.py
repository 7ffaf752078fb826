"""``textlm``: a byte-level GPT-style transformer (867k parameters) on offline text.

A real language-model workload that needs no download: next-byte prediction with
:class:`~tandem.workloads.transformer.TinyGPT` (pre-LN, causal attention, learned positions, untied
head), trained with AdamW (decay on matrices only), a warm-up + cosine schedule and gradient
clipping at 1.0 (:mod:`~tandem.workloads.recipes`). Evaluation reports the loss (nats per byte),
its perplexity and next-byte ``accuracy``.

Corpus (option ``corpus``), read as raw bytes (vocabulary 256), at most ``max_bytes`` of it:

* ``stdlib`` (default): the Python standard library's own ``*.py`` sources
  (``sysconfig.get_paths()["stdlib"]``), present wherever Python is. Read depth-first, a folder's
  files (sorted by name) before its subfolders (sorted), skipping ``site-packages``,
  ``dist-packages``, ``__pycache__`` and the machine-specific ``_sysconfigdata*`` files, so the
  bytes depend only on the Python version (``meta["corpus_sha256"]`` tells two apart). The
  top-level modules alone hold ~4.7 MB (Python 3.11), so the default 2 MB is ``__future__.py``
  into ``ipaddress.py``.
* ``kjv``: the King James Bible (4.1 MB of English; raise ``max_bytes`` to read it all) from
  Debian's ``bible-kjv-text`` package, whose compressed text is unpacked by its reader ``bible``
  (package ``bible-kjv``, which ``bible-kjv-text`` recommends). One verse per line, verse
  references removed. Install with ``make bench-data`` or
  ``apt-get install bible-kjv-text bible-kjv``.
* any other value: a path to a text file of your own (read as bytes). ``workload.data_path``
  names one too, when ``corpus`` is not set.

Samples: the corpus is cut into non-overlapping windows of ``context + 1`` bytes (the remainder
is dropped); a window gives ``x = window[:-1]`` and ``y = window[1:]`` (int64, ``(context,)``
each). Split: whole blocks of 32 consecutive windows (~2 KB of text at context 64), evenly spaced
through the corpus, form the test set (``test_windows``, default 256, i.e. 8 blocks), so test
text is never trained on and still samples the whole corpus. The split is a function of the
options only, not of the seed.

Measured on the 2-core development machine (shared, one thread): building takes 0.07-0.2 s
(stdlib, 2 MB; ``kjv`` ~0.5 s, most of it the reader's unpacking); one forward+backward at
batch 16 x context 64 takes 80-100 ms; with lr 3e-3, batch 16, clipping and the warm-up/cosine
schedule over the run, a single process reaches a test loss of 2.72 nats/byte (33% next-byte
accuracy) after 60 steps and 2.34 (39%) after 300, from 5.58 (lr 1e-3: 2.35; 1e-2: 2.74).

Options: ``corpus``, ``max_bytes`` (default 2,000,000; memory is ~1 KB per window of 64 as two
int64 tensors, so ~32 MB per worker), ``context`` (64), ``d_model`` (128), ``layers`` (4),
``heads`` (4), ``tie_weights`` (false), ``dropout`` (0.0), ``test_windows`` (256).
Parameters: exactly 867,072 with the defaults (``tie_weights: true``: 834,304); in general
:func:`~tandem.workloads.transformer.parameter_count`: ``d_model: 256, layers: 6`` gives 4.9M,
``d_model: 256, layers: 12, context: 128`` 9.6M.

Tuning: the defaults ``lr`` 3e-3 and ``batch_size`` 16 suit the default size; for 5-10M
parameters use ~1e-3. The schedule warms up over 5% of the run's steps and decays to 10% of
``lr`` at the end, so a run's length shapes it: compare methods at equal step counts.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sysconfig
from functools import partial
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, model_validator

from tandem.config import WorkloadConfig
from tandem.errors import ConfigError, DataError
from tandem.workloads.base import ArrayDataset, Options, Workload, parse_options, register_workload
from tandem.workloads.metrics import sequence_cross_entropy, token_accuracy
from tandem.workloads.recipes import adamw_groups, warmup_cosine
from tandem.workloads.transformer import TinyGPT, parameter_count

VOCAB = 256
#: consecutive windows per test block
TEST_BLOCK = 32
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
KJV_PACKAGE, KJV_READER_PACKAGE = "bible-kjv-text", "bible-kjv"
#: where bible-kjv-text keeps ``bible.data`` when dpkg cannot be asked
KJV_DATA_DIRS = [Path("/usr/lib"), Path("/usr/share/bible-kjv")]
#: where bible-kjv installs its reader when it is not on PATH
KJV_READERS = [Path("/usr/bin/bible"), Path("/usr/games/bible")]
KJV_RANGE = "Gen1:1-Rev22:21"
KJV_HOW_TO_GET = (f"install it with `make bench-data` or `apt-get install {KJV_PACKAGE} "
                  f"{KJV_READER_PACKAGE}`, or give the text as a file: corpus: /path/to/file.txt")


class TextLMOptions(Options):
    corpus: str = Field(default="stdlib", min_length=1, description="stdlib (Python's own "
                        "sources), kjv (Debian's bible-kjv-text) or a path to a text file")
    max_bytes: int = Field(default=2_000_000, ge=1024, description="read at most this many "
                           "bytes of the corpus (~16 bytes of memory per byte, per worker)")
    context: int = Field(default=64, ge=2, le=8192, description="bytes of context per sample "
                         "(the model's longest input)")
    d_model: int = Field(default=128, ge=8, description="transformer width (a multiple of heads)")
    layers: int = Field(default=4, ge=1, description="transformer blocks")
    heads: int = Field(default=4, ge=1, description="attention heads per block")
    tie_weights: bool = Field(default=False, description="share the byte embedding with the "
                              "output head")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on embeddings, "
                           "attention and residual branches")
    test_windows: int = Field(default=256, ge=1, description="test samples, taken as blocks of "
                              "32 consecutive windows spread over the corpus")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TextLMOptions:
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of heads "
                             f"({self.heads})")
        return self


def stdlib_corpus(max_bytes: int) -> tuple[bytes, str]:
    """The standard library's ``*.py`` sources in a fixed order, up to ``max_bytes`` bytes."""
    root = sysconfig.get_paths()["stdlib"]
    parts: list[bytes] = []
    total = 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            try:
                data = Path(folder, name).read_bytes()
            except OSError:
                continue
            parts.append(data[: max_bytes - total])
            total += len(parts[-1])
            if total >= max_bytes:
                return b"".join(parts), root
    if not parts:
        raise DataError(f"no *.py files found under the standard library folder {root}; "
                        "give a text file instead: corpus: /path/to/file.txt")
    return b"".join(parts), root


def _kjv_data_dir() -> Path | None:
    try:
        out = subprocess.run(["dpkg", "-L", KJV_PACKAGE], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    listed = [Path(line).parent for line in out.splitlines() if line.endswith("/bible.data")]
    for folder in listed + KJV_DATA_DIRS:
        if (folder / "bible.data").is_file():
            return folder
    return None


def _kjv_reader() -> str | None:
    found = shutil.which("bible")
    if found:
        return found
    return next((str(p) for p in KJV_READERS if p.is_file() and os.access(p, os.X_OK)), None)


def kjv_corpus(max_bytes: int) -> tuple[bytes, str]:
    """The King James Bible as text, one verse per line, unpacked by Debian's ``bible`` reader."""
    folder = _kjv_data_dir()
    if folder is None:
        looked = ", ".join(str(d / "bible.data") for d in KJV_DATA_DIRS)
        raise DataError(f"corpus kjv: the King James text ({KJV_PACKAGE}) is not installed "
                        f"(`dpkg -L {KJV_PACKAGE}` lists nothing; looked at {looked}); "
                        f"{KJV_HOW_TO_GET}")
    reader = _kjv_reader()
    if reader is None:
        raise DataError(f"corpus kjv: {folder / 'bible.data'} is compressed and needs its reader "
                        f"`bible`, which is not installed; {KJV_HOW_TO_GET}")
    if " " in str(folder):
        raise DataError(f"corpus kjv: the reader cannot search a folder with a space in its "
                        f"name ({folder})")
    try:
        done = subprocess.run([reader, "-f", "-p", str(folder), KJV_RANGE], capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        raise DataError(f"corpus kjv: running {reader} failed: {err}") from None
    if done.returncode != 0 or len(done.stdout) < 1_000_000:
        raise DataError(f"corpus kjv: `{reader} -f -p {folder} {KJV_RANGE}` exited with "
                        f"{done.returncode} and printed {len(done.stdout)} bytes (expected "
                        f"~4.4 MB): {done.stderr.decode(errors='replace').strip()[:300]}; "
                        f"reinstall with `apt-get install --reinstall {KJV_PACKAGE} "
                        f"{KJV_READER_PACKAGE}`")
    # each line is "Ge1:1 In the beginning ...": drop the reference, keep the verse
    text = re.sub(rb"(?m)^\S+ ", b"", done.stdout)
    return text[:max_bytes], str(folder / "bible.data")


def file_corpus(path: str | Path, max_bytes: int) -> tuple[bytes, str]:
    """The first ``max_bytes`` bytes of a file."""
    file = Path(path).expanduser()
    if not file.is_file():
        what = "a folder, not a file" if file.is_dir() else "not found"
        raise DataError(f"corpus {str(path)!r}: {what}. Give a text file, or one of the built-in "
                        f"corpora: stdlib, kjv")
    try:
        with file.open("rb") as fh:
            return fh.read(max_bytes), str(file.resolve())
    except OSError as err:
        raise DataError(f"corpus {str(path)!r}: cannot read it: {err}") from None


def load_corpus(corpus: str, max_bytes: int) -> tuple[bytes, str]:
    """``(bytes, source)`` for a corpus name (``stdlib``, ``kjv``) or a file path."""
    if corpus == "stdlib":
        return stdlib_corpus(max_bytes)
    if corpus == "kjv":
        return kjv_corpus(max_bytes)
    return file_corpus(corpus, max_bytes)


def make_windows(data: bytes, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping ``context + 1``-byte windows as next-byte pairs ``(x, y)``, int64."""
    n = len(data) // (context + 1)
    raw = np.frombuffer(data, dtype=np.uint8, count=n * (context + 1))
    win = torch.from_numpy(raw.astype(np.int64)).view(n, context + 1)
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()


def split_blocks(n: int, test_windows: int, block: int = TEST_BLOCK) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
    """Sorted (train, test) window indices: test = whole blocks, evenly spaced (see module doc).

    ``ceil(test_windows / block)`` blocks of ``block`` consecutive windows are taken at evenly
    spaced block positions; the first ``test_windows`` of their windows are the test set, and
    every other window (including windows left past the last whole block) is training data.
    """
    if test_windows > n // 2:
        raise DataError(f"the corpus gives only {n} windows, too few for {test_windows} test "
                        "windows and at least as many training ones: raise max_bytes, lower "
                        "test_windows or context, or use a larger corpus")
    blocks = n // block
    k = -(-test_windows // block)
    if k > blocks:  # tiny corpus: fall back to windows spread evenly, one at a time
        block, blocks, k = 1, n, test_windows
    starts = [((2 * i + 1) * blocks // (2 * k)) * block for i in range(k)]
    test = torch.cat([torch.arange(s, s + block) for s in starts])[:test_windows]
    mask = torch.ones(n, dtype=torch.bool)
    mask[test] = False
    return torch.nonzero(mask).flatten(), test.sort().values


@register_workload("textlm", options=TextLMOptions)
def build(cfg: WorkloadConfig, seed: int = 0) -> Workload:
    opts = parse_options(TextLMOptions, cfg.options, "textlm")
    corpus = opts.corpus
    if cfg.data_path is not None:
        if "corpus" in opts.model_fields_set:
            raise ConfigError(f"workload textlm: both data_path ({cfg.data_path}) and option "
                              f"corpus ({opts.corpus!r}) name the corpus; give one")
        corpus = str(cfg.data_path)
    data, source = load_corpus(corpus, opts.max_bytes)
    x, y = make_windows(data, opts.context)
    train_idx, test_idx = split_blocks(len(x), opts.test_windows)
    params = parameter_count(opts.d_model, opts.layers, opts.context, opts.tie_weights, VOCAB)
    model_fn = partial(TinyGPT, vocab=VOCAB, context=opts.context, d_model=opts.d_model,
                       layers=opts.layers, heads=opts.heads, tie_weights=opts.tie_weights,
                       dropout=opts.dropout)
    return Workload(
        name="textlm", model_fn=model_fn,
        train=ArrayDataset(x[train_idx], y[train_idx]), test=ArrayDataset(x[test_idx], y[test_idx]),
        loss_fn=sequence_cross_entropy, task="language", num_classes=None,
        metrics={"accuracy": token_accuracy}, optimizer=adamw_groups, scheduler=warmup_cosine,
        clip_grad_norm=1.0, defaults={"lr": 3e-3, "batch_size": 16},
        meta={"parameters": params, "corpus": corpus if corpus in ("stdlib", "kjv") else "file",
              "corpus_source": source, "corpus_bytes": len(data),
              "corpus_sha256": hashlib.sha256(data).hexdigest()[:16], "context": opts.context,
              "vocab": VOCAB, "train_windows": len(train_idx), "test_windows": len(test_idx),
              "options": opts.model_dump()},
    )
