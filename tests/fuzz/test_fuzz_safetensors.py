"""Fuzzing the safetensors readers (issue 19): network files and base-model single files.

Property (fuzz/one_line.py): any file gives a result or a `MeebsError` of one line, never
another exception, never a hang. Entry points, each fed every kind of input:

* generate: the network header and values (`read_network_header`, `check_values`), the
  metadata generate obeys (size, clip skip, token length, recorded base), and applying
  the network to the tiny base (`apply_network`: `read_shapes`, `check_fits`, lycoris);
* inspect: `describe`;
* merge: `read_network` and `merge_into` the tiny base;
* network.weights: `load_network_weights` into a network on the tiny base;
* `read_metadata` and `addnet_hash`;
* the base single-file loader (`meebs.models.single_file.load_file`).

Inputs: random bytes; random JSON headers; and a valid LoHA, LoHA-Tucker, LoCon network
and an SD 1.x-layout base file, each first changed in ways that keep the file readable
(shapes transposed or reshaped, dtypes of the same width, tensors dropped, renamed under
another prefix or into another module, values set to NaN, metadata of every kind) and
then, maybe, broken: the 8-byte header length (0, 1, huge, past the end, 2**63), the
JSON (not JSON, not an object, nested 100,000 deep), an entry's dtype, shape (negative,
[2**40, 2**40]) or data_offsets (reversed, overlapping, past the end), a key written
twice, `__metadata__` that is not a dict of strings, truncation, appended bytes.

Bound: a file of at most 1 MiB, whatever sizes it declares (100 GB, [2**40, 2**40],
factors whose product would be 1 GiB), raises a process's peak RSS by at most
MEMORY_BOUND_MIB, checked in a subprocess (`test_memory_stays_bounded`: safetensors is
Rust, which tracemalloc does not see), and is read within the profile's 5 s deadline.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import resource
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from subprocess import PIPE

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from random_networks import random_network
from safetensors.torch import save

from fuzz.one_line import result_or_one_line
from meebs.errors import MeebsError
from meebs.files.safetensors_io import DTYPE_BITS, addnet_hash, read_metadata
from meebs.models import single_file
from meebs.models.builtin_models import build_tiny
from meebs.network.apply import apply_network, remove_network
from meebs.network.build import NetworkSpec, build_network
from meebs.network.load_weights import load_network_weights
from meebs.network.network_file import check_values, read_network_header
from meebs.use import generate
from meebs.use.inspect import describe
from meebs.use.merge import merge_into, read_network

TESTS = Path(__file__).resolve().parents[1]
MEMORY_BOUND_MIB = 64
MAX_FILE = 2**20
# One pytest-timeout for a whole fuzz test: 10,000 examples of the slowest entry point
# take minutes on two busy cores.
TIMEOUT = 120 + settings().max_examples // 5
# Modules of the seed networks: a Linear, a 3x3 and a 1x1 conv, and cross-attention.
SEED_MODULES = ("te_text_model_encoder_layers_0_mlp_fc1", "unet_conv_in", "attn2_to_k", "proj_in")
SEED_SPECS = {
    "loha": NetworkSpec(),
    "loha-tucker": NetworkSpec(use_tucker=True),
    "locon": NetworkSpec(algo="locon"),
}
SAME_WIDTH = {
    bits: sorted(name for name, width in DTYPE_BITS.items() if width == bits)
    for bits in (8, 16, 32, 64)
}
SIZES = [-1, 0, 1, 2, 3, 4, 32, 64, 768, 1024, 2**31, 2**40, 2**63, 2**64 + 1, 10**30]
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.just([]),
    st.just({}),
)
METADATA_VALUES = [
    "",
    "x" * 300_000,
    "[/bold]",
    "\x1b[2J\x07",
    "a\nb\r\x00",
    "{}",
    "[1]",
    '{"model": 5}',
    '{"model": {"path": "base.ckpt", "allow_pickle": true}}',
    '{"model": {"builtin": "tiny"}, "output": {"name": 5}}',
    '{"model": {"builtin": "x\\u0000y"}}',
    '{"a": {"b": 1e999}}',
    '{"a": {"b": "c"}}',
    "[" * 50_000,
    "0",
    "-3",
    "99",
    "10000000000000000000000",
    "64x64",
    "8x8",
    "100000x100000",
    "nan",
    "\ud800",  # a lone surrogate: json.dumps escapes it, Python would read it back
    "x\u2028y\x85",
]
METADATA_KEYS = [
    "meebs_recipe",
    "ss_tag_frequency",
    "ss_training_comment",
    "ss_output_name",
    "ss_clip_skip",
    "ss_max_token_length",
    "modelspec.resolution",
    "ss_base_model_version",
    "ss_new_sd_model_hash",
    "sshs_model_hash",
]


# ---------------------------------------------------------------------------- seeds


@functools.cache
def network_seeds() -> list[tuple[dict[str, dict], dict[str, str]]]:
    """(tensors, metadata) of small valid networks on the tiny base: a few modules each,
    every factor random (as after training), in fp16 like the trainer saves them."""
    seeds = []
    for spec in SEED_SPECS.values():
        network = random_network(spec, seed=0)
        state = {
            key: value.detach().half().contiguous()
            for key, value in network.state_dict().items()
            if any(module in key.split(".")[0] for module in SEED_MODULES)
        }
        recipe = json.dumps({"model": {"builtin": "tiny"}, "output": {"name": "seed"}})
        seeds.append((_records(state), {"meebs_recipe": recipe, "ss_clip_skip": "1"}))
    return seeds


@functools.cache
def base_seed() -> tuple[dict[str, dict], dict[str, str]]:
    """A file with the SD 1.x single-file layout (768-wide cross-attention, text encoder
    and VAE keys) but few and small tensors: it passes the layout check and fails the
    strict load, so both are fuzzed, in 0.2 s an example."""
    state = {
        single_file.CROSS_ATTENTION_KEY: torch.ones(1, 768, dtype=torch.float16),
        single_file.CONV_IN_KEY: torch.ones(1, 4, 3, 3, dtype=torch.float16),
        single_file.TEXT_PREFIX + "text_model.embeddings.position_ids": torch.arange(77)[None],
        single_file.VAE_PREFIX + "post_quant_conv.weight": torch.ones(4, 4, 1, 1),
        "model_ema.decay": torch.tensor(0.999),
    }
    return _records(state), {"format": "pt"}


def _records(state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """{name: {dtype, shape, blob}}: tensors as the header will describe them."""
    raw = save(state)
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    data = raw[8 + length :]
    return {
        name: {"dtype": e["dtype"], "shape": e["shape"], "blob": data[slice(*e["data_offsets"])]}
        for name, e in header.items()
    }


# ---------------------------------------------------------------------------- strategies


def encode(records: dict[str, dict], metadata: object, twice: str | None = None) -> bytes:
    """A safetensors file with offsets laid out as safetensors does; `twice` names a
    key written a second time (with the entry of the first record) in the JSON text."""
    entries, data = [], b""
    for name, record in records.items():
        entry = {
            "dtype": record["dtype"],
            "shape": record["shape"],
            "data_offsets": [len(data), len(data) + len(record["blob"])],
        }
        entries.append((name, record.get("entry", entry)))
        data += record["blob"]
    if twice is not None and entries:
        entries.append((twice, entries[0][1]))
    pairs = [] if metadata is None else [("__metadata__", metadata)]
    text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs + entries) + "}"
    header = text.encode("utf-8", "surrogatepass")
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


@st.composite
def readable_change(draw, records: dict[str, dict], metadata: dict) -> None:
    """Change `records`/`metadata` in place so that the file stays readable safetensors."""
    name = draw(st.sampled_from(sorted(records)))
    record = records[name]
    kind = draw(st.sampled_from(["reshape", "dtype", "drop", "rename", "copy", "nan", "meta"]))
    if kind == "reshape":  # transposed, flattened, or any shape of the same size
        numel = len(record["blob"]) * 8 // DTYPE_BITS[record["dtype"]]
        shapes = [record["shape"][::-1], [numel], [1, numel], [numel, 1], [numel, 1, 1, 1], []]
        record["shape"] = draw(st.sampled_from([s for s in shapes if _numel(s) == numel]))
    elif kind == "dtype":  # the same bytes read as another type of the same width
        record["dtype"] = draw(st.sampled_from(SAME_WIDTH[DTYPE_BITS[record["dtype"]]]))
    elif kind == "drop":
        del records[name]
    elif kind in ("rename", "copy"):
        module, _, suffix = name.partition(".")
        new = draw(
            st.one_of(
                st.sampled_from(
                    [
                        name.replace("lora_te_", "lora_te1_"),
                        name.replace("lora_unet_", "lora_te2_"),
                        f"{module}.{draw(st.sampled_from(_SUFFIXES))}",
                        f"lora_unet_not_a_layer.{suffix}",
                        f"{draw(st.sampled_from(sorted(records)).map(_module))}.{suffix}",
                        name + "\n",
                        "x" * 5000,
                    ]
                ),
                st.text(min_size=1, max_size=30),
            )
        )
        records[new] = record if kind == "rename" else dict(record)
        if kind == "rename" and new != name:
            del records[name]
    elif kind == "nan":
        fill = draw(st.sampled_from([b"\xff", b"\x00", b"\x7f\x80", b"\x00\x00\x80\x7f"]))
        blob = record["blob"]
        record["blob"] = (fill * len(blob))[: len(blob)] if draw(st.booleans()) else blob
    else:
        key = draw(st.one_of(st.sampled_from(METADATA_KEYS), st.text(max_size=20)))
        metadata[key] = draw(st.one_of(st.sampled_from(METADATA_VALUES), st.text(max_size=50)))


def _module(name: str) -> str:
    return name.partition(".")[0]


_SUFFIXES = [
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "alpha",
    "lora_up.weight",
    "lora_down.weight",
    "lora_mid.weight",
    "lokr_w1",
    "dora_scale",
]


def _numel(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


@st.composite
def breaking_change(draw, records: dict[str, dict], metadata: dict) -> tuple[object, str | None]:
    """Change the header so that it no longer describes the file rightly; returns the
    metadata to write and a key to write twice."""
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "entry", "twice", "metadata"]))
    name = draw(st.sampled_from(sorted(records))) if records else None
    if name is None or kind == "metadata":
        junk = st.one_of(JUNK, st.dictionaries(st.text(max_size=5), JUNK, max_size=3))
        return draw(st.one_of(junk, st.just(metadata))), None
    record = records[name]
    entry = {"dtype": record["dtype"], "shape": record["shape"], "data_offsets": [0, 0]}
    record["entry"] = entry
    if kind == "twice":
        return metadata, name
    if kind == "dtype":
        entry["dtype"] = draw(st.one_of(st.sampled_from([*DTYPE_BITS, "Q4", "f16", ""]), JUNK))
    elif kind == "shape":
        entry["shape"] = draw(
            st.one_of(st.lists(st.sampled_from(SIZES), max_size=5), st.just([2**40, 2**40]), JUNK)
        )
    elif kind == "offsets":
        entry["data_offsets"] = draw(
            st.one_of(st.lists(st.sampled_from([*SIZES, 10**11]), max_size=3), JUNK)
        )
    else:
        entry.pop(draw(st.sampled_from(sorted(entry))))
        if draw(st.booleans()):
            record["entry"] = draw(JUNK)
    return metadata, None


def _fix_offsets(records: dict[str, dict]) -> None:
    """Give a broken entry the offsets it would have had, unless they are the change."""
    start = 0
    for record in records.values():
        entry = record.get("entry")
        if isinstance(entry, dict) and entry.get("data_offsets") == [0, 0]:
            entry["data_offsets"] = [start, start + len(record["blob"])]
        start += len(record["blob"])


@st.composite
def byte_change(draw, raw: bytes) -> bytes:
    """Byte-level damage: the length field, bytes of the header, the end of the file."""
    kind = draw(st.sampled_from(["none"] * 6 + ["length", "flip", "truncate", "append"]))
    length = struct.unpack("<Q", raw[:8])[0]
    if kind == "length":
        value = draw(
            st.sampled_from([0, 1, 2, 7, length - 1, length + 8, len(raw), 2**63, 2**64 - 1])
            | st.integers(0, 2**64 - 1)
        )
        return struct.pack("<Q", value % 2**64) + raw[8:]
    if kind == "flip":
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, min(len(data), 8 + length) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "truncate":
        return raw[: draw(st.integers(0, len(raw)))]
    if kind == "append":
        return raw + draw(st.binary(min_size=1, max_size=64))
    return raw


@st.composite
def seed_files(draw, seeds: Callable[[], list]) -> bytes:
    records, metadata = copy.deepcopy(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(0, 3))):
        if records:
            draw(readable_change(records, metadata))
    twice = None
    if records and draw(st.integers(0, 2)) == 0:
        metadata, twice = draw(breaking_change(records, metadata))
        _fix_offsets(records)
    raw = encode(records, metadata, twice)
    return draw(byte_change(raw))[:MAX_FILE]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def random_headers(draw) -> bytes:
    """A length, a random JSON header (maybe deeply nested), random data."""
    value = draw(st.one_of(json_values, st.just("deep")))
    text = "[" * 100_000 + "]" * 100_000 if value == "deep" else json.dumps(value)
    header = text.encode()
    return struct.pack("<Q", len(header)) + header + draw(st.binary(max_size=64))


def any_file() -> st.SearchStrategy[bytes]:
    networks = seed_files(lambda: network_seeds())
    return st.one_of(
        st.binary(max_size=256),
        random_headers(),
        networks,
        networks,
        networks,
        seed_files(lambda: [base_seed()]),
        seed_files(lambda: [base_seed()]),
    )


# ---------------------------------------------------------------------------- entry points


@functools.cache
def _tiny(role: str):
    """A tiny base per entry point (merge changes its weights), built once."""
    base = build_tiny()
    if role == "weights":
        torch.manual_seed(0)
        return build_network(base.unet, base.text_encoder, NetworkSpec())
    return base


def generate_path(path: Path) -> object:
    """What generate does with a network file before it samples, on the tiny base."""
    header = read_network_header(path)
    check_values(path, header)
    tag = generate.NetworkTag(name="x", te=1.0, unet=1.0, text="<lyco:x:1>")
    resolved = [generate.Resolved(tag, path, header.metadata)]
    generate._size(None, resolved)
    generate._recorded_int(resolved, "ss_clip_skip", 1, generate.CLIP_SKIPS)
    generate._recorded_int(resolved, "ss_max_token_length", 75, generate.MAX_TOKEN_LENGTHS)
    if "meebs_recipe" in header.metadata:
        generate._recorded_model(resolved[0])
    remove_network(apply_network(path, _tiny("generate"), te=1.0, unet=1.0))
    return header


def merge_path(path: Path) -> None:
    base = _tiny("merge")
    merge_into(base.unet, base.text_encoder, read_network(path), 1.0)


ENTRY_POINTS: dict[str, Callable[[Path], object]] = {
    "generate": generate_path,
    "inspect": describe,
    "merge": merge_path,
    "network.weights": lambda path: load_network_weights(_tiny("weights"), path),
    "metadata+hash": lambda path: (read_metadata(path), addnet_hash(path)),
    "base single file": lambda path: single_file.load_file(path, None, False),
}
_FOLDER = tempfile.TemporaryDirectory(prefix="meebs-fuzz-")


def call_entry(entry: str, content: bytes) -> object:
    """`content` written to a file and given to one entry point, checked for the property."""
    path = Path(_FOLDER.name) / "fuzzed.safetensors"
    path.write_bytes(content)
    return result_or_one_line(ENTRY_POINTS[entry], path)


def run_entry(entry: str, content: bytes) -> object:
    """`call_entry`, and a statistics event saying how far the input got."""
    outcome = call_entry(entry, content)
    if isinstance(outcome, MeebsError):  # --hypothesis-show-statistics: how deep inputs get
        text = str(outcome).replace(str(Path(_FOLDER.name)), "")
        words = re.findall(r"(?<![\w.])[a-z]+(?![\w.])", text, re.ASCII)
        event("refused: " + " ".join(words[:6]))
    else:
        event("result")
    return outcome


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@given(content=any_file())
def test_any_file_gives_a_result_or_one_line(entry, content):
    run_entry(entry, content)


# ---------------------------------------------------------------------------- regressions

FC1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"
CROSS = single_file.CROSS_ATTENTION_KEY
ZERO_64X2 = bytes(64 * 2 * 2)  # an F16 [64, 2]


def seed_with(change: Callable[[dict, dict], object], seed: int = 0) -> bytes:
    """The LoHA (0), LoHA-Tucker (1) or LoCon (2) seed network with one change."""
    records, metadata = copy.deepcopy(network_seeds()[seed])
    change(records, metadata)
    return encode(records, metadata)


def base_with(change: Callable[[dict], object]) -> bytes:
    records, metadata = copy.deepcopy(base_seed())
    change(records)
    return encode(records, metadata)


def _drop(records: dict, name: str) -> None:
    del records[name]


def _rename(records: dict, old: str, new: str) -> None:
    records[new] = records.pop(old)


# Inputs the fuzzing found that failed on the code before issue 19 (entry point, input,
# what the message must say now). Each raised another exception, or a message of several
# lines or thousands of characters.
REGRESSIONS = {
    # lycoris' loader: copy_(None), a factor missing
    "generate, a factor missing": (
        "generate",
        lambda: seed_with(lambda r, m: _drop(r, f"{FC1}.hada_w2_b")),
        "hada_w2_b missing",
    ),
    # lycoris: copy_ of [4, 64] into [64, 4]: RuntimeError
    "generate, factors that do not multiply": (
        "generate",
        lambda: seed_with(lambda r, m: r[f"{FC1}.hada_w1_a"].update(shape=[64, 2], blob=ZERO_64X2)),
        "do not multiply",
    ),
    # lycoris: `float(None)`, a module without alpha (A1111 reads it as scale 1)
    "generate, a module without alpha": (
        "generate",
        lambda: seed_with(lambda r, m: _drop(r, f"{FC1}.alpha")),
        None,
    ),
    # lycoris: NoneType has no make_module_from_state_dict, a module of unknown tensors
    "generate, a module of one unknown tensor": (
        "generate",
        lambda: seed_with(lambda r, m: _rename(r, f"{FC1}.hada_w1_a", "lora_unet_conv_in.x")),
        "hada_w1_a missing",
    ),
    # describe: json.loads(meebs_recipe) raised JSONDecodeError
    "inspect, meebs_recipe that is not JSON": (
        "inspect",
        lambda: seed_with(lambda r, m: m.update(meebs_recipe="not json")),
        None,
    ),
    # merge: a 5000-character key echoed whole
    "merge, a 5000-character key": (
        "merge",
        lambda: seed_with(lambda r, m: _rename(r, f"{FC1}.alpha", "x" * 5000)),
        "...",
    ),
    # merge: module_delta read shape[0] of a 0-d factor: IndexError
    "merge, a factor of no dimensions": (
        "merge",
        lambda: seed_with(lambda r, m: r[f"{FC1}.hada_w1_b"].update(shape=[], blob=b"\0\0")),
        None,
    ),
    # network.weights: a key with a newline broke the message in two
    "network.weights, a key with a newline": (
        "network.weights",
        lambda: seed_with(lambda r, m: _rename(r, f"{FC1}.alpha", f"{FC1}.alpha\n")),
        "\\n",
    ),
    # read_metadata: json.loads of a header nested 100,000 deep: RecursionError
    "metadata, a header nested 100,000 deep": (
        "metadata+hash",
        lambda: _raw(b"[" * 100_000 + b"]" * 100_000),
        "nested too deeply",
    ),
    # check_sd1_layout: context[-1] of a 0-d cross-attention weight: IndexError
    "base, a 0-d cross-attention weight": (
        "base single file",
        lambda: base_with(lambda r: r[CROSS].update(shape=[], blob=b"\0\0")),
        "768 wide",
    ),
}


def _raw(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_regressions_are_one_line(name):
    entry, content, expected = REGRESSIONS[name]
    outcome = call_entry(entry, content())
    if expected is not None:
        assert isinstance(outcome, MeebsError) and expected in str(outcome), outcome


# ---------------------------------------------------------------------------- memory


@functools.cache
def huge_declarations() -> dict[str, bytes]:
    """Files of at most 1 MiB that declare far more: what a reader must not allocate."""
    f16 = {"dtype": "F16", "blob": b""}
    tags = json.dumps({"a": {f"t{i}": i for i in range(50_000)}})
    offsets = {"t": {"dtype": "F16", "shape": [5 * 10**10], "data_offsets": [0, 10**11]}}
    return {
        "header length 2**63": struct.pack("<Q", 2**63) + b"{}",
        "header length 100 MB - 1": struct.pack("<Q", 99_999_999) + b"{}" * 512,
        "shape [2**40, 2**40]": encode({"t": {**f16, "shape": [2**40, 2**40]}}, None),
        "100 GB of data_offsets": _raw(json.dumps(offsets).encode()),
        "15,000 entries": encode({f"t{i}": {**f16, "shape": [0]} for i in range(15_000)}, None),
        "1 MiB of tag metadata": seed_with(lambda r, m: m.update(ss_tag_frequency=tags)),
        "a 1 GiB product of LoRA factors": encode(
            _records(
                {
                    f"{FC1}.lora_up.weight": torch.ones(16384, 1, dtype=torch.float16),
                    f"{FC1}.lora_down.weight": torch.ones(1, 16384, dtype=torch.float16),
                    f"{FC1}.alpha": torch.tensor(1.0),
                }
            ),
            {},
        ),
        "a Tucker core of 512 x 512": encode(
            _records(
                {
                    f"lora_unet_conv_in.hada_{name}": tensor
                    for name, tensor in {
                        "t1": torch.ones(1, 1, 512, 512, dtype=torch.float16),
                        "t2": torch.ones(1, 1, 1, 1, dtype=torch.float16),
                        "w1_a": torch.ones(1, 32, dtype=torch.float16),
                        "w1_b": torch.ones(1, 4, dtype=torch.float16),
                        "w2_a": torch.ones(1, 32, dtype=torch.float16),
                        "w2_b": torch.ones(1, 4, dtype=torch.float16),
                    }.items()
                }
            ),
            {},
        ),
        "a JSON header nested 500,000 deep": _raw(b"[" * 500_000 + b"]" * 500_000),
    }


@pytest.mark.parametrize("name", list(huge_declarations()))
def test_huge_declarations_are_one_line(name):
    content = huge_declarations()[name]
    for entry in ENTRY_POINTS:
        call_entry(entry, content)


def memory_probe(examples: int) -> dict[str, float]:
    """This process's resident size (MiB) after warming every entry point up on the seeds,
    and its peak after every huge declaration and `examples` fuzzed files went through
    every entry point. Run in a fresh process (`test_memory_stays_bounded`)."""
    for content in [encode(*seed) for seed in (*network_seeds(), base_seed())]:
        for entry in ENTRY_POINTS:
            call_entry(entry, content)
    # the peak so far (warm-up included) is no rise: reset it to the current size (Linux 4.0+)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS") / 1024
    limit = _status_kib("VmSize") * 1024 + 4 * 2**30  # a safety net: MemoryError, not swap
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 else min(limit, hard), hard))
    for content in huge_declarations().values():
        assert len(content) <= MAX_FILE
        for entry in ENTRY_POINTS:
            _measured(entry, content)

    @settings(max_examples=max(1, examples), derandomize=True, database=None, deadline=None)
    @given(content=any_file(), entry=st.sampled_from(list(ENTRY_POINTS)))
    def fuzz(content, entry):
        _measured(entry, content)

    if examples:
        fuzz()
    after = _status_kib("VmHWM") / 1024  # the peak since the reset
    return {"before_mib": before, "after_mib": after, "examples": examples}


def _measured(entry: str, content: bytes) -> None:
    """`call_entry`; any failure but running out of memory is the other tests' business."""
    try:
        call_entry(entry, content)
    except MemoryError:
        raise
    except Exception:
        pass


def _status_kib(field: str) -> int:
    """A size from /proc/self/status (Linux), in KiB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1))


@pytest.fixture(scope="module", autouse=True)
def memory_probe_process(request):
    """Start the memory probe's process when the module starts, if its test is to run:
    importing torch takes it seconds, spent while the fuzz tests run."""
    if not any(item.name == "test_memory_stays_bounded" for item in request.session.items):
        yield None
        return
    examples = settings().max_examples // 20 if settings().max_examples > 100 else 0
    code = (
        "import json; from fuzz.test_fuzz_safetensors import memory_probe; "
        f"print(json.dumps(memory_probe({examples})))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    command = [sys.executable, "-c", code]
    process = subprocess.Popen(command, env=env, stdout=PIPE, stderr=PIPE, text=True)
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.mark.timeout(TIMEOUT)
def test_memory_stays_bounded(memory_probe_process):
    """A file of <= 1 MiB that declares 100 GB, [2**40, 2**40], a 1 GiB product or a
    Tucker core of 512 x 512 raises the resident size by at most MEMORY_BOUND_MIB, at peak."""
    out, err = memory_probe_process.communicate(timeout=TIMEOUT)
    assert memory_probe_process.returncode == 0, err[-3000:]
    figures = json.loads(out.strip().splitlines()[-1])
    rise = figures["after_mib"] - figures["before_mib"]
    print(f"resident {figures['before_mib']:.0f} MiB, peak after {figures['after_mib']:.0f} MiB")
    assert rise <= MEMORY_BOUND_MIB, figures
