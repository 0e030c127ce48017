"""python -m bench.sass: the instruction mix of each CUDA kernel's main loop, read from the SASS
(machine code) that cuobjdump prints for the built extension, per GPU architecture in it.

The main loop of a kernel is the loop holding the most tensor-core instructions (MMA); a kernel
with none gets the loop with the most FFMA/DFMA instead, labelled "no tensor cores". A loop is a
backward branch: a BRA (predicated or not) to an earlier address of the same function, its body
the instructions from the target to the branch. Counts are static: each instruction in the body
counts once, whether or not a given iteration runs it.

--check holds every tensor-core kernel to the project's target for its main loop (the constants at
the top of bench/sass.py) and exits 1 listing each kernel and architecture that misses it (2 when
no tensor-core kernel matched).
"""
import argparse
import collections
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

MMA_OPCODES = {"HMMA", "IMMA", "DMMA", "BMMA", "HGMMA", "IGMMA", "BGMMA", "QGMMA"}
FMA_OPCODES = {"FFMA", "DFMA"}
# Opcode prefixes of division and float <-> int conversions: an integer division by a runtime
# value is I2F, MUFU.RCP, F2I; a float division is MUFU.RCP (and a call to its slow path).
DIVISION_LIKE = ("MUFU.RCP", "I2F", "F2I")

# The target --check holds each tensor-core kernel's main loop to.
MAX_NON_MMA_PER_MMA = 4.0
MAX_NARROW_GLOBAL_LOADS = 2  # global loads narrower than 16 bytes (say, a mask value)
REQUIRED_BARRIERS = 1

# Kernel names in the table keep this many levels of template arguments (deeper ones print as
# "...") and at most this many characters; the JSON keeps the whole name.
NAME_TEMPLATE_DEPTH = 3
NAME_CHARS = 150

_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_HEX_TARGET = re.compile(r"\b0x([0-9a-f]+)\s*$")


@dataclasses.dataclass
class Instruction:
    address: int
    opcode: str  # with its modifiers, without the predicate: "LDGSTS.E.BYPASS.128"
    operands: str
    predicate: str  # "@P0", "@!P1" ... or ""

    @property
    def root(self):
        return self.opcode.split(".")[0]

    @property
    def never(self):
        """ptxas pads some sequences with `@!PT LDS RZ, [RZ]`: it takes an issue slot (it counts
        in the loop's instructions) but never executes (it counts as no load)."""
        return self.predicate == "@!PT"

    def target(self):
        """The address a BRA or CALL goes to, or None."""
        if self.root not in ("BRA", "CALL"):
            return None
        match = _HEX_TARGET.search(self.operands)
        return int(match.group(1), 16) if match else None


@dataclasses.dataclass
class Function:
    mangled: str
    arch: str
    instructions: list


def parse_sass(text):
    """Functions of `cuobjdump -sass` output (of a fatbinary or of one cubin), per architecture."""
    functions, arch = [], None
    for line in text.splitlines():
        if match := re.match(r"\s*code for (sm_\w+)", line):
            arch = match.group(1)
        elif match := re.match(r"\s*Function : (\S+)", line):
            functions.append(Function(match.group(1), arch, []))
        elif functions and (match := _INSTRUCTION.match(line)):
            address, predicate, opcode, operands = match.groups()
            functions[-1].instructions.append(
                Instruction(int(address, 16), opcode, operands.strip(), (predicate or "").strip()))
    return functions


@dataclasses.dataclass
class Loop:
    start: int  # index of the first instruction (the branch target)
    end: int  # index of the last backward branch to it


def back_edges(instructions):
    """(target index, branch index) of every backward branch; a branch to itself (the trap after
    the last EXIT) is none."""
    index = {instruction.address: i for i, instruction in enumerate(instructions)}
    edges = []
    for i, instruction in enumerate(instructions):
        target = instruction.target() if instruction.root == "BRA" else None
        if target is not None and target < instruction.address and target in index:
            edges.append((index[target], i))
    return edges


def find_loops(instructions):
    """One loop per branch target; several back-edges to one target (a `continue`) extend it."""
    ends = {}
    for start, end in back_edges(instructions):
        ends[start] = max(end, ends.get(start, end))
    return [Loop(start, end) for start, end in sorted(ends.items())]


def _count(instructions, opcodes):
    return sum(instruction.root in opcodes for instruction in instructions)


def main_loop(function):
    """(loop, True) for the loop with the most MMA, (loop, False) for the one with the most
    FFMA/DFMA when no loop holds an MMA, (None, False) when none holds either. Ties go to the
    shortest loop: an outer loop around the one holding every MMA adds none."""
    loops = find_loops(function.instructions)
    for opcodes, tensor_cores in ((MMA_OPCODES, True), (FMA_OPCODES, False)):
        counted = [(_count(function.instructions[loop.start:loop.end + 1], opcodes), loop) for loop in loops]
        best = max(counted, key=lambda pair: (pair[0], -(pair[1].end - pair[1].start)), default=(0, None))
        if best[0]:
            return best[1], tensor_cores
    return None, False


def division_subroutine(instructions, address):
    """Whether a CALL to `address` enters a subroutine that divides: code that reaches a RET
    before any EXIT and holds a division-like instruction on the way. (A CALL.REL.NOINC to just
    past a loop's closing BRA is how nvcc leaves a loop; the code there reaches EXIT first.)"""
    divides = False
    for instruction in instructions:
        if instruction.address < address:
            continue
        if instruction.root == "EXIT":
            return False
        if instruction.root == "RET":
            return divides
        divides = divides or _division_like(instruction)
    return False


def _division_like(instruction):
    return instruction.opcode.startswith(DIVISION_LIKE)


def _width(opcode):
    """A memory access's width from its opcode: 128 and 64 (bits), U16, S8 ...; 32 when unsaid."""
    for token in opcode.split(".")[1:]:
        if token in ("128", "64", "32", "U16", "S16", "U8", "S8"):
            return token
    return "32"


def loop_mix(function, loop, tensor_cores):
    """The instruction mix of `loop` of `function`, as a JSON-ready dict."""
    body = function.instructions[loop.start:loop.end + 1]
    by_root = lambda roots: dict(collections.Counter(i.opcode for i in body if i.root in roots and not i.never))
    division = collections.Counter(i.opcode for i in body if _division_like(i))
    for instruction in body:
        target = instruction.target() if instruction.root == "CALL" else None
        if target is not None and division_subroutine(function.instructions, target):
            division["CALL (division subroutine)"] += 1
    mma = _count(body, MMA_OPCODES)
    nested = [(start, end) for start, end in back_edges(function.instructions)
              if loop.start < start and end < loop.end]
    return {
        "tensor_cores": tensor_cores,
        "start": f"{body[0].address:04x}",
        "end": f"{body[-1].address:04x}",
        "instructions": len(body),
        "mma": mma,
        "fma": _count(body, FMA_OPCODES),
        "non_mma_per_mma": (len(body) - mma) / mma if mma else None,
        "global_loads": by_root({"LDG"}),
        "ldgsts": by_root({"LDGSTS"}),
        "ldsm": by_root({"LDSM"}),
        "lds": by_root({"LDS"}),
        "sts": by_root({"STS"}),
        "bar": _count(body, {"BAR"}),
        "depbar": _count(body, {"DEPBAR"}),  # cp.async.wait_group
        "ldgdepbar": _count(body, {"LDGDEPBAR"}),  # cp.async.commit_group
        "division": dict(division),
        "nested_loops": [f"{function.instructions[s].address:04x}-{function.instructions[e].address:04x}"
                         for s, e in nested],
    }


def misses(mix):
    """Why a tensor-core main loop misses the target (empty when it meets it)."""
    reasons = []
    if mix["nested_loops"]:
        reasons.append(f"loop nested inside the main loop ({', '.join(mix['nested_loops'])})")
    copies = {**mix["global_loads"], **mix["ldgsts"]}
    wide = sum(count for opcode, count in copies.items() if _width(opcode) == "128")
    narrow = {opcode: count for opcode, count in copies.items() if _width(opcode) != "128"}
    if not wide:
        reasons.append("no 16-byte global loads (LDGSTS.128 or LDG.E.128) in the main loop")
    if sum(narrow.values()) > MAX_NARROW_GLOBAL_LOADS:
        reasons.append(f"{sum(narrow.values())} global loads narrower than 16 bytes "
                       f"({_format_counts(narrow)}), at most {MAX_NARROW_GLOBAL_LOADS} allowed")
    if mix["division"]:
        reasons.append(f"division-like instructions ({_format_counts(mix['division'])})")
    if mix["bar"] != REQUIRED_BARRIERS:
        reasons.append(f"{mix['bar']} BAR, want exactly {REQUIRED_BARRIERS}")
    if mix["non_mma_per_mma"] > MAX_NON_MMA_PER_MMA:
        reasons.append(f"{mix['non_mma_per_mma']:.1f} non-MMA instructions per MMA, at most "
                       f"{MAX_NON_MMA_PER_MMA:g} allowed")
    return reasons


def _format_counts(counts, key=None):
    """{"LDG.E.U16": 4, "LDG.E": 1} -> "LDG.E.U16 x4, LDG.E x1"; with `key`, tersely for the table:
    grouped by key(opcode), "U16x4 32x1"."""
    if key is None:
        return ", ".join(f"{opcode} x{count}" for opcode, count in counts.items())
    grouped = collections.Counter()
    for opcode, count in counts.items():
        grouped[key(opcode)] += count
    return " ".join(f"{name}x{count}" for name, count in grouped.most_common()) or "-"


def _division_kind(opcode):
    """Table shorthand: MUFU.RCP -> RCP, I2F.U32.RP -> I2F, CALL (division subroutine) -> CALL."""
    if opcode.startswith("MUFU."):
        return opcode.split(".")[1]
    return opcode.split(".")[0].split(" ")[0]


def find_cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    candidates += [Path(home) / "bin" / "cuobjdump"
                   for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda") if home]
    triton = importlib.util.find_spec("triton")  # torch's triton ships cuobjdump; found without importing it
    if triton and triton.origin:
        candidates.append(Path(triton.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    return next((str(c) for c in candidates if c and Path(c).is_file()), None)


def find_library():
    """The newest partialconv_cuda/_C*.so next to the package Python would import, else in this
    source tree."""
    spec = importlib.util.find_spec("partialconv_cuda")
    folders = [Path(spec.origin).parent] if spec and spec.origin else []
    for folder in [*folders, REPO / "partialconv_cuda"]:
        builds = sorted(folder.glob("_C*.so"), key=lambda path: path.stat().st_mtime)
        if builds:
            return builds[-1]
    return None


def demangle(names):
    """{mangled: demangled} through c++filt, then llvm-cxxfilt for what c++filt leaves mangled (it
    gives up on some CUTLASS kernels); names stay mangled without either."""
    demangled = {name: name for name in names}
    for tool in ("c++filt", "llvm-cxxfilt"):
        pending = [name for name in names if demangled[name] == name]
        if pending and shutil.which(tool):
            result = subprocess.run([tool], input="\n".join(pending), capture_output=True, text=True)
            if result.returncode == 0:
                demangled.update(zip(pending, result.stdout.splitlines()))
    return demangled


def short_name(demangled):
    """`void ns::kernel<ns::A<B<C<D>>>>(args)` -> `kernel<A<B<C<...>>>>`: no return type, parameter
    list or namespaces, template arguments NAME_TEMPLATE_DEPTH levels deep, NAME_CHARS at most."""
    name, depth = demangled.replace("(anonymous namespace)::", ""), 0
    for i, char in enumerate(name):
        depth += (char == "<") - (char == ">")
        if char == "(" and depth == 0:
            name = name[:i]
            break
    name = re.sub(r"\b[A-Za-z_]\w*::", "", name.removeprefix("void "))
    kept, depth = [], 0
    for char in name:
        depth -= char == ">"
        if depth <= NAME_TEMPLATE_DEPTH:
            kept.append(char)
        if char == "<":
            depth += 1
            if depth == NAME_TEMPLATE_DEPTH + 1:
                kept.append("...")
    name = re.sub(r"\s+>", ">", "".join(kept))
    return name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 3] + "..."


def analyse(library, cuobjdump, kernel_pattern=None):
    """One record per kernel and architecture of `library` (a shared library, fatbinary or cubin)."""
    result = subprocess.run([cuobjdump, "-sass", str(library)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"python -m bench.sass: {cuobjdump} -sass {library} failed:\n{result.stderr}")
    functions = parse_sass(result.stdout)
    names = demangle(sorted({function.mangled for function in functions}))
    first_seen = {}
    records = []
    for function in functions:
        name = names[function.mangled]
        if kernel_pattern and not (re.search(kernel_pattern, name) or re.search(kernel_pattern, function.mangled)):
            continue
        first_seen.setdefault(function.mangled, len(first_seen))
        loop, tensor_cores = main_loop(function)
        mix = loop_mix(function, loop, tensor_cores) if loop else None
        records.append({
            "kernel": short_name(name),
            "demangled": name,
            "mangled": function.mangled,
            "arch": function.arch,
            "instructions": len(function.instructions),
            "mma": _count(function.instructions, MMA_OPCODES),
            "main_loop": mix,
            "misses": misses(mix) if tensor_cores else None,  # None: not a tensor-core kernel
        })
    records.sort(key=lambda record: (first_seen[record["mangled"]], record["arch"]))
    return records


def _target(record):
    if record["misses"] is not None:
        return "miss" if record["misses"] else "ok"
    if record["main_loop"] is None:
        return "no MMA/FMA loop"
    return "no tensor cores" + (f" in a loop ({record['mma']} MMA)" if record["mma"] else "")


def table(records):
    header = ["arch", "loop", "instrs", "MMA", "non-MMA/MMA", "LDG", "LDGSTS", "LDSM", "LDS", "STS", "BAR",
              "DEPBAR", "division", "nested", "target", "kernel"]
    rows = [header]
    for record in records:
        mix = record["main_loop"]
        if mix is None:
            rows.append([record["arch"], *["-"] * 13, _target(record), record["kernel"]])
            continue
        per_mma = mix["non_mma_per_mma"]
        rows.append([
            record["arch"], f"{mix['start']}-{mix['end']}", str(mix["instructions"]), str(mix["mma"]),
            "-" if per_mma is None else f"{per_mma:.1f}",
            _format_counts(mix["global_loads"], _width), _format_counts(mix["ldgsts"], _width),
            str(sum(mix["ldsm"].values())), _format_counts(mix["lds"], _width), str(sum(mix["sts"].values())),
            str(mix["bar"]), str(mix["depbar"]), _format_counts(mix["division"], _division_kind),
            str(len(mix["nested_loops"])), _target(record), record["kernel"],
        ])
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bench.sass", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", type=Path, help="shared library, fatbinary or cubin to read (default: the "
                        "newest partialconv_cuda/_C*.so of the importable package or of this source tree)")
    parser.add_argument("--kernel", metavar="REGEX", help="only kernels whose (demangled or mangled) name matches")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 unless every tensor-core main loop has no nested loop, 16-byte global loads "
                        f"(at most {MAX_NARROW_GLOBAL_LOADS} narrower), no division-like instructions, exactly "
                        f"{REQUIRED_BARRIERS} BAR and at most {MAX_NON_MMA_PER_MMA:g} non-MMA instructions per MMA")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the records as JSON")
    parser.add_argument("--cuobjdump", help="cuobjdump to use (default: on PATH, in CUDA_HOME, or triton's)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    library = args.library or find_library()
    if library is None:
        raise SystemExit("python -m bench.sass: no partialconv_cuda/_C*.so found; build it "
                         "(python setup.py build_ext --inplace) or pass --library")
    cuobjdump = args.cuobjdump or find_cuobjdump()
    if cuobjdump is None:
        raise SystemExit("python -m bench.sass: no cuobjdump (CUDA toolkit or torch's triton); pass --cuobjdump")
    records = analyse(library, cuobjdump, args.kernel)
    archs = sorted({record["arch"] for record in records})
    print(f"{library}: {len({r['mangled'] for r in records})} kernels, SASS for {', '.join(archs) or 'nothing'}")
    print("main loop: the loop with the most MMA, else FFMA/DFMA; static counts over [target, back-edge]; "
          "widths in bits, U16 = 2 bytes")
    print(table(records))
    if args.json:
        thresholds = {"max_non_mma_per_mma": MAX_NON_MMA_PER_MMA,
                      "max_narrow_global_loads": MAX_NARROW_GLOBAL_LOADS, "required_barriers": REQUIRED_BARRIERS}
        args.json.write_text(json.dumps({"library": str(library), "cuobjdump": cuobjdump,
                                         "thresholds": thresholds, "kernels": records}, indent=1) + "\n")
    if not args.check:
        return 0
    checked = [record for record in records if record["misses"] is not None]
    failed = [record for record in checked if record["misses"]]
    if not checked:
        print("\n--check: no tensor-core kernel to check", file=sys.stderr)
        return 2
    if failed:
        print(f"\n--check: {len(failed)} of {len(checked)} tensor-core kernel x arch miss the target:")
        for record in failed:
            print(f"{record['kernel']} [{record['arch']}]")
            for reason in record["misses"]:
                print(f"    {reason}")
        return 1
    print(f"\n--check: all {len(checked)} tensor-core kernel x arch meet the target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
