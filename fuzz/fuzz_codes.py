"""Fuzz run of the codes readers (``nws.unpack_codes``, and ``nws upgrade``'s reader of format 2 streams):
seeded mutations of real packed streams.

The streams: format 3 coded alone, against a reference with and without the pools' neighbour ranks (the
codes of tasks that moved away from a reference as training moves them, with a grown classifier and an
empty layer), and format 2. Each case damages one stream with one or more seeded mutations (bit flips,
byte overwrites, truncation, extension, deleted or duplicated chunks, splices with another stream, varints
rewritten) and, for format 3, mostly *reseals* it (its leading CRC made valid again), so the damage reaches
the parser and the decoder instead of stopping at the CRC. The reader must raise ``CodesError`` or return
exactly the original codes (format 2, which has no CRC, may also return other valid codes); anything else
(another exception, or wrong codes) is a failure, printed and saved under ``--crashes``.

    python fuzz/fuzz_codes.py --cases 10000 --seed 0

Exit status 1 if any case failed.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from nws.bitcodes import CodesError, crc, varint
from nws.packing import pack_codes
from nws.unpacking import unpack_codes
from nws.upgrade import legacy_codes

K = 64


def streams() -> list[tuple[str, bytes, dict, dict | None, dict | None, dict]]:
    """(name, stream, layout, reference, pools, codes) for each kind of stream."""
    rng = np.random.default_rng(0)
    pools = {name: torch.from_numpy(rng.standard_normal((K, d)).astype(np.float32))
             for name, d in (("conv", 9), ("fc", 1), ("other", 9))}
    reference = {"conv": torch.from_numpy(rng.integers(0, K, 600)), "fc": torch.from_numpy(rng.integers(0, K, 40)),
                 "other": torch.from_numpy(rng.integers(0, K, 50))}
    codes = {name: r.clone() for name, r in reference.items()}
    for name, fraction in (("conv", 0.1), ("other", 0.5)):
        hit = torch.from_numpy(rng.random(len(codes[name])) < fraction)
        order = np.argsort(((pools[name][:, None] - pools[name][None]) ** 2).sum(-1).numpy(), axis=1)
        codes[name][hit] = torch.from_numpy(order[codes[name][hit].numpy(), rng.integers(1, 6, int(hit.sum()))])
    codes["fc"] = torch.cat([codes["fc"], torch.from_numpy(rng.integers(0, K, 8))])
    codes["empty"] = torch.zeros(0, dtype=torch.long)
    layout = {name: (K, len(v)) for name, v in codes.items()}
    v2 = bytes.fromhex(
        "4e575343020305636f6e76314096010205656d707479040000026663030a001b1571e117f01eeb84815f9ff83f0b35fd2002"
        "09097080208054064825c83dd40210912685b32f278a9a420cbf6ad1672d58bd4626090cde298a59a26be87dca257a8765"
        "8027462d94e52a9c76096905660b14e260c8af97db8ab87813afde3515c85acc1ac187f509b023e16a2bbb2d00")
    v2_layout = {"conv1": (64, 150), "empty": (4, 0), "fc": (3, 10)}
    return [
        ("alone", pack_codes(codes, K), layout, None, None, codes),
        ("reference", pack_codes(codes, K, reference), layout, reference, None, codes),
        ("ranks", pack_codes(codes, K, reference, pools), layout, reference, pools, codes),
        ("format2", v2, v2_layout, None, None, legacy_codes(v2, v2_layout)),
    ]


def mutate(data: bytes, other: bytes, rnd: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rnd.choice([1, 1, 1, 2, 3, 5])):
        kind = rnd.choice(["flip", "byte", "truncate", "extend", "delete", "duplicate", "splice", "varint"])
        pos = rnd.randrange(len(out) + 1)
        if kind == "flip" and out:
            pos = rnd.randrange(len(out))
            out[pos] ^= 1 << rnd.randrange(8)
        elif kind == "byte" and out:
            out[rnd.randrange(len(out))] = rnd.choice([0, 1, 0x7F, 0x80, 0xFF, rnd.randrange(256)])
        elif kind == "truncate":
            del out[pos:]
        elif kind == "extend":
            out[pos:pos] = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 9)))
        elif kind == "delete":
            del out[pos : pos + rnd.randrange(1, 9)]
        elif kind == "duplicate":
            out[pos:pos] = out[pos : pos + rnd.randrange(1, 17)]
        elif kind == "splice" and other:
            start = rnd.randrange(len(other))
            out[pos : pos + rnd.randrange(0, 17)] = other[start : start + rnd.randrange(1, 17)]
        elif kind == "varint":
            out[pos:pos] = varint(rnd.choice([0, 1, 127, 128, 1 << 31, (1 << 31) + 1, 1 << 62]))
    return bytes(out)


def reseal(data: bytes) -> bytes:
    """Make a format 3 stream's leading CRC valid again (when the stream still has one)."""
    if len(data) < 9 or data[:5] != b"NWSC\x03":
        return data
    return data[:5] + crc(data[9:]).to_bytes(4, "little") + data[9:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crashes", type=Path, default=Path("fuzz_codes_crashes"))
    args = parser.parse_args()
    rnd = random.Random(args.seed)
    cases = streams()
    outcomes: Counter[str] = Counter()
    failures = 0
    start = time.perf_counter()
    for case in range(args.cases):
        name, data, layout, reference, pools, codes = rnd.choice(cases)
        other = rnd.choice(cases)[1]
        damaged = mutate(data, other, rnd)
        if rnd.random() < 0.9:
            damaged = reseal(damaged)
        try:
            if name == "format2":  # an earlier nws's stream: read by nws upgrade
                out = legacy_codes(damaged, layout)
            else:
                out = unpack_codes(damaged, layout, reference, pools)
        except CodesError as err:
            outcomes[f"{name}: {re.sub(r'[0-9]+', 'N', str(err))[:100]}"] += 1
            continue
        except Exception:  # noqa: BLE001 - any other exception is the failure this run looks for
            failures += 1
            args.crashes.mkdir(parents=True, exist_ok=True)
            (args.crashes / f"case{case}_{name}.bin").write_bytes(damaged)
            print(f"case {case} ({name}): crash\n{traceback.format_exc()}", file=sys.stderr)
            continue
        if list(out) != list(codes) or not all(torch.equal(out[k], codes[k]) for k in codes):
            if name == "format2":  # format 2 has no CRC: a damaged stream may decode to other valid codes
                outcomes[f"{name}: decoded other valid codes (no CRC in format 2)"] += 1
                continue
            failures += 1
            args.crashes.mkdir(parents=True, exist_ok=True)
            (args.crashes / f"case{case}_{name}.bin").write_bytes(damaged)
            print(f"case {case} ({name}): decoded to wrong codes", file=sys.stderr)
            continue
        outcomes[f"{name}: decoded the original codes"] += 1
    print(f"{args.cases} cases (seed {args.seed}) in {time.perf_counter() - start:.0f} s: {failures} failures")
    for outcome, count in sorted(outcomes.items()):
        print(f"{count:6d}  {outcome}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
