#!/usr/bin/env bash
# The aarch64 proof, on a Debian 12 x86-64 host without an ARM machine:
#
#   bash benchmarks/arm_qemu_check.sh [WORKDIR]       (default WORKDIR: /tmp/fusedtx-arm)
#
# Cross-compiles the C++ CPU extension (fusedtx._C) for aarch64 with aarch64-linux-gnu-g++,
# against the headers and libraries of PyPI's aarch64 torch wheel, runs it under qemu-user on
# an arm64 Debian Python, and compares every native and reference output of
# tests/output_hashes.py with the committed x86-64 table tests/output_hashes.json. The rows that
# output_hashes.portable() calls host-independent must be the same bits on both; the others are
# listed for information. The report goes to benchmarks/results/arm_qemu_hashes.txt (or to
# $ARM_QEMU_RESULT); the exit status is 1 when a portable row differs.
#
# Everything it fetches or builds is cached under WORKDIR, so a second run only rebuilds what
# changed (the extension, when csrc/ or the flags change) and reruns the check:
#   apt/      a private apt configuration for arm64 (the host's dpkg is left alone)
#   sysroot/  the arm64 .debs of python3.11 and its libraries, unpacked with dpkg -x
#   pipvenv/  a host venv whose pip downloads the aarch64 wheels (torch, numpy, torch's deps)
#   pyroot/   those wheels, installed with pip --target
#   stubs/    empty stand-ins for the CUDA libraries (see step 4)
#   build/    the cross-compiled extension, one folder per (sources, flags, torch) hash
#   stage/    a copy of fusedtx/ with the aarch64 _C module in it: what the guest imports
#
# Environment: ARM_QEMU_THREADS (OpenMP threads in the guest, default 2), ARM_QEMU_OPS (a
# space-separated subset of output_hashes.OPS, default all), ARM_QEMU_CPU (the qemu CPU model,
# default neoverse-n1: ARMv8.2-A with NEON and no SVE, a Graviton2-class core).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${1:-/tmp/fusedtx-arm}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
RESULT=${ARM_QEMU_RESULT:-$REPO/benchmarks/results/arm_qemu_hashes.txt}
THREADS=${ARM_QEMU_THREADS:-2}
OPS=${ARM_QEMU_OPS:-}
QEMU_CPU=${ARM_QEMU_CPU:-neoverse-n1}
TORCH_VERSION=2.13.0
PY_VERSION=3.11                 # Debian 12's python3.11 (3.11.2): the wheels are cp311
SYSROOT=$WORK/sysroot
PYROOT=$WORK/pyroot
STUBS=$WORK/stubs
CXX=aarch64-linux-gnu-g++
START=$(date +%s)
step() { echo "=== $* ($(( $(date +%s) - START )) s)" >&2; }

# ---------------------------------------------------------------------------------------------
step "1. host tools: the cross compiler, qemu-user, python3-venv"
missing=()
command -v $CXX >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
/usr/bin/python3 -c "import ensurepip, venv" 2>/dev/null || missing+=(python3-venv)
if (( ${#missing[@]} )); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---------------------------------------------------------------------------------------------
step "2. arm64 sysroot: Debian's python$PY_VERSION and its libraries"
# A private apt state (lists, cache, an empty dpkg status) for arm64 only: nothing is added to
# the host's dpkg architectures and no arm64 package is installed on the host. `install
# --download-only` against the empty status resolves the whole dependency closure.
APT=$WORK/apt
APT_OPTS=(-o Dir::Etc::SourceList="$APT/sources.list" -o Dir::Etc::SourceParts="$APT/sources.d"
          -o Dir::Etc::PreferencesParts="$APT/prefs.d" -o Dir::State="$APT/state"
          -o Dir::State::status="$APT/state/status" -o Dir::Cache="$APT/cache"
          -o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o Debug::NoLocking=1
          -o APT::Sandbox::User=root -qq)
# python3.11-minimal + libpython3.11-stdlib: the interpreter and the standard library's C
# modules; libstdc++6, libgcc-s1: what torch's libraries link; libpython3.11-dev: Python.h and
# the arm64 pyconfig.h for the cross build (its own dependencies are not needed).
DEBS="python$PY_VERSION-minimal libpython$PY_VERSION-stdlib libstdc++6 libgcc-s1 zlib1g"
if [[ $(cat "$SYSROOT/.debs" 2>/dev/null) != "$DEBS" ]]; then
    mkdir -p "$APT"/state/lists/partial "$APT"/cache/archives/partial "$APT"/sources.d "$APT"/prefs.d "$APT/dev"
    : > "$APT/state/status"
    key=/usr/share/keyrings/debian-archive-keyring.gpg
    cat > "$APT/sources.list" <<EOF
deb [arch=arm64 signed-by=$key] http://deb.debian.org/debian bookworm main
deb [arch=arm64 signed-by=$key] http://deb.debian.org/debian bookworm-updates main
deb [arch=arm64 signed-by=$key] http://deb.debian.org/debian-security bookworm-security main
EOF
    apt-get "${APT_OPTS[@]}" update
    apt-get "${APT_OPTS[@]}" install -y --download-only --no-install-recommends $DEBS >/dev/null
    (cd "$APT/dev" && rm -f ./*.deb && apt-get "${APT_OPTS[@]}" download "libpython$PY_VERSION-dev")
    rm -rf "$SYSROOT"
    mkdir -p "$SYSROOT"
    for deb in "$APT"/cache/archives/*.deb "$APT"/dev/*.deb; do dpkg -x "$deb" "$SYSROOT"; done
    echo "$DEBS" > "$SYSROOT/.debs"
fi
PYTHON_ARM=$SYSROOT/usr/bin/python$PY_VERSION

# What the guest sees of the CPU. qemu-user 7.2 passes /proc and /sys through from the host, so
# an arm64 process reads an x86 /proc/cpuinfo; torch's cpuinfo library (ATen's CPU capability,
# asked on the first vectorised op) finds no ARM core in it and crashes. qemu looks every path up
# under -L's prefix first, so these files describe the emulated core instead: two Neoverse N1
# (implementer 0x41, part 0xd0c), matching -cpu neoverse-n1.
cpus=$SYSROOT/sys/devices/system/cpu
if [[ ! -f $SYSROOT/proc/cpuinfo ]]; then
    mkdir -p "$SYSROOT/proc" "$cpus"
    for i in 0 1; do
        printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' "$i"
        mkdir -p "$cpus/cpu$i/regs/identification" "$cpus/cpu$i/topology"
        echo 0x00000000413fd0c1 > "$cpus/cpu$i/regs/identification/midr_el1"
        for f in thread_siblings_list core_cpus_list core_id; do echo "$i" > "$cpus/cpu$i/topology/$f"; done
        for f in core_siblings_list package_cpus_list; do echo 0-1 > "$cpus/cpu$i/topology/$f"; done
        echo 0 > "$cpus/cpu$i/topology/physical_package_id"
    done > "$SYSROOT/proc/cpuinfo.tmp"
    for f in possible present online; do echo 0-1 > "$cpus/$f"; done
    mv "$SYSROOT/proc/cpuinfo.tmp" "$SYSROOT/proc/cpuinfo"
fi

# ---------------------------------------------------------------------------------------------
step "3. aarch64 wheels: torch $TORCH_VERSION, numpy and torch's pure-Python dependencies"
# --no-deps with an explicit list: the wheel's CUDA dependencies (cuda-toolkit, cudnn, nccl,
# several GB) and triton are left out on purpose; fusedtx imports without triton, and step 4
# stands in for the CUDA libraries.
WHEELS="torch==$TORCH_VERSION numpy typing_extensions sympy mpmath networkx jinja2 markupsafe filelock fsspec"
PIP_PLATFORM=(--platform manylinux_2_28_aarch64 --only-binary=:all: --python-version "$PY_VERSION"
              --implementation cp --no-deps)
if [[ $(cat "$PYROOT/.wheels" 2>/dev/null) != "$WHEELS" ]]; then
    [[ -x $WORK/pipvenv/bin/pip ]] || /usr/bin/python3 -m venv "$WORK/pipvenv"
    "$WORK/pipvenv/bin/pip" download -q -d "$WORK/wheels" "${PIP_PLATFORM[@]}" $WHEELS
    rm -rf "$PYROOT"
    "$WORK/pipvenv/bin/pip" install -q --no-index --find-links "$WORK/wheels" --target "$PYROOT" \
        "${PIP_PLATFORM[@]}" $WHEELS
    echo "$WHEELS" > "$PYROOT/.wheels"
fi
TORCH=$PYROOT/torch

# ---------------------------------------------------------------------------------------------
step "4. stand-ins for the CUDA libraries torch's aarch64 wheel links"
# PyPI's aarch64 torch is the CUDA build: libtorch_cpu.so itself needs libcudart and libcupti,
# libtorch_cuda.so a dozen more (cublas, cudnn, nccl, ...), and none of them is installed. Each
# missing library gets a stub with its soname and symbol version that defines every symbol
# torch's libraries take from it: a function returning 100 (cudaErrorNoDevice, CUDA_ERROR_NO_DEVICE;
# an error code for the other libraries too), or for the *String/*Name functions a message.
# torch.cuda.is_available() is then False, and no CPU code path calls them.
if [[ $(cat "$STUBS/.done" 2>/dev/null) != "$WHEELS" ]]; then
    rm -rf "$STUBS"
    mkdir -p "$STUBS"
    /usr/bin/python3 - "$TORCH" "$SYSROOT" "$STUBS" "$PYTHON_ARM" <<'PY'
import glob, os, re, subprocess, sys

torch_dir, sysroot, out, python = sys.argv[1:]

def readelf(*args):
    return subprocess.run(["aarch64-linux-gnu-readelf", "-W", *args], check=True, capture_output=True,
                          text=True).stdout

def needed(path):
    return re.findall(r"\(NEEDED\).*\[(.*)\]", readelf("-d", path))

def dynsyms(path):  # (section index, type, binding, name, version)
    for line in readelf("--dyn-syms", path).splitlines():
        f = line.split()
        if len(f) >= 8 and f[0].endswith(":") and f[0][:-1].isdigit():
            name, _, version = f[7].partition("@")
            yield f[6], f[3], f[4], name, version.lstrip("@")

libdirs = [f"{torch_dir}/lib", f"{sysroot}/lib/aarch64-linux-gnu", f"{sysroot}/usr/lib/aarch64-linux-gnu"]

def find(lib):
    return next((f"{d}/{lib}" for d in libdirs if os.path.exists(f"{d}/{lib}")), None)

elfs = sorted(glob.glob(f"{torch_dir}/lib/*.so*") + glob.glob(f"{torch_dir}/**/*.cpython-*.so", recursive=True))
missing = sorted({lib for e in elfs for lib in needed(e) if find(lib) is None})
# Every symbol the present libraries (and the interpreter, which exports the Python API) define.
defined, todo, seen = set(), elfs + [python], set()
while todo:
    path = todo.pop()
    if path not in seen:
        seen.add(path)
        defined |= {name for ndx, *_, name, _ in dynsyms(path) if ndx != "UND"}
        todo += [p for lib in needed(path) if (p := find(lib))]
# What each missing library must define: the symbols bound to its version, and the unversioned
# undefined ones of the libraries that need it.
want = {lib: {} for lib in missing}
for e in elfs:
    version_file, current = {}, None
    for line in readelf("-V", e).splitlines():
        if m := re.search(r"File: (\S+)", line):
            current = m.group(1)
        elif (m := re.search(r"Name: (\S+)", line)) and current:
            version_file[m.group(1)] = current
    for ndx, typ, bind, name, version in dynsyms(e):
        if ndx != "UND" or not name or name in defined or bind == "WEAK":
            continue
        if version and version_file.get(version) in want:
            want[version_file[version]][name] = (typ, version)
        elif not version:
            for lib in needed(e):
                if lib in want:
                    want[lib].setdefault(name, (typ, None))
returns_text = re.compile(r"(String|Name)$|^ncclGetLastError$")
for lib, symbols in want.items():
    asm = [".section .rodata", 'msg: .asciz "no CUDA (fusedtx arm_qemu_check stub)"', ".text"]
    for name, (typ, _) in sorted(symbols.items()):
        if typ == "OBJECT":
            asm += [".data", f'.globl "{name}"', f'.type "{name}", %object', f'.size "{name}", 256',
                    f'"{name}": .zero 256', ".text"]
        else:
            body = "adrp x0, msg\n  add x0, x0, :lo12:msg" if returns_text.search(name) else "mov x0, #100"
            asm += [f'.globl "{name}"', f'.type "{name}", %function', f'"{name}":\n  {body}\n  ret']
    with open(f"{out}/{lib}.S", "w") as f:
        f.write("\n".join(asm) + "\n")
    versions = sorted({v for _, v in symbols.values() if v})
    with open(f"{out}/{lib}.map", "w") as f:
        for i, v in enumerate(versions):  # the unversioned symbols go with the first version
            names = sorted(n for n, (_, sv) in symbols.items() if sv == v or (i == 0 and sv is None))
            f.write(v + " { global: " + " ".join(f'"{n}";' for n in names) + " };\n")
    print(f"  stub {lib}: {len(symbols)} symbols, versions {versions or 'none'}", file=sys.stderr)
PY
    for src in "$STUBS"/*.S; do
        lib=${src%.S}
        vscript=()
        [[ -s $lib.map ]] && vscript=(-Wl,--version-script="$lib.map")
        aarch64-linux-gnu-gcc -shared -nostdlib -Wl,-soname,"${lib##*/}" "${vscript[@]}" -o "$lib" "$src"
    done
    echo "$WHEELS" > "$STUBS/.done"
fi

# ---------------------------------------------------------------------------------------------
step "5. cross-compiling fusedtx._C for aarch64"
# The sources and flags are fusedtx/_build_config.py's, as for every other build, with
# FUSEDTX_MARCH=armv8-a (the baseline every aarch64 core has). Around them, what
# torch.utils.cpp_extension adds: the extension defines, torch's include directories, -fPIC.
# The C++ ABI must be the wheel's: its libc10.so exports std::__cxx11 strings or not.
CONFIG=$(FUSEDTX_MARCH=armv8-a /usr/bin/python3 - "$REPO/fusedtx/_build_config.py" <<'PY'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_build_config", sys.argv[1])
cfg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cfg)
print(" ".join(cfg.sources(with_cuda=False)))
print(" ".join(cfg.cxx_flags(with_cuda=False)))
print(" ".join(cfg.LD_FLAGS))
PY
)
SOURCES=$(sed -n 1p <<< "$CONFIG")
CXXFLAGS=$(sed -n 2p <<< "$CONFIG")
LDFLAGS=$(sed -n 3p <<< "$CONFIG")
# (grep reads all of nm's output: with -q, nm could die of SIGPIPE and pipefail say "no")
if aarch64-linux-gnu-nm -D --defined-only "$TORCH/lib/libc10.so" | grep __cxx11 >/dev/null; then ABI=1; else ABI=0; fi
PY_INC=$SYSROOT/usr/include/python$PY_VERSION
# Debian's Python.h includes <aarch64-linux-gnu/python3.11/pyconfig.h>: -idirafter finds it there
# without putting the sysroot's include folder ahead of the cross compiler's own.
DEFINES="-DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=$ABI"
INCLUDES="-isystem $TORCH/include -isystem $TORCH/include/torch/csrc/api/include -isystem $PY_INC -idirafter $SYSROOT/usr/include"
# The OpenMP runtime: -fopenmp would link the cross toolchain's libgomp; link the one the wheel
# ships (torch/lib/libgomp.so.1, the one libtorch_cpu.so loads) so that the extension needs no
# symbol version that libgomp lacks and one OpenMP runtime serves both.
LINK_LIBS="-L$TORCH/lib -lc10 -ltorch_cpu -ltorch -ltorch_python $TORCH/lib/libgomp.so.1"
LINK_FLAGS="-shared ${LDFLAGS//-fopenmp/} -Wl,-rpath-link,$TORCH/lib:$STUBS"
KEY=$( { $CXX --version | head -1; echo "$DEFINES $CXXFLAGS $LINK_FLAGS $LINK_LIBS $TORCH_VERSION";
         cat "$REPO"/csrc/*.h "$REPO"/csrc/*.cpp "$REPO"/csrc/cpu/*; } | sha256sum | cut -c1-12)
BUILD=$WORK/build/$KEY
EXT=_C.cpython-${PY_VERSION/./}-aarch64-linux-gnu.so
if [[ ! -f $BUILD/$EXT ]]; then
    rm -rf "$BUILD"
    mkdir -p "$BUILD"
    objs=()
    for src in $SOURCES; do
        obj=$BUILD/$(basename "${src%.cpp}").o
        echo "  $CXX ... -c ${src#$REPO/}" >&2
        nice -n 10 $CXX $DEFINES $INCLUDES -fPIC $CXXFLAGS -c "$src" -o "$obj"
        objs+=("$obj")
    done
    echo "  $CXX -shared ... -o $EXT" >&2
    $CXX "${objs[@]}" $LINK_FLAGS $LINK_LIBS -o "$BUILD/$EXT.tmp"
    mv "$BUILD/$EXT.tmp" "$BUILD/$EXT"
    echo "$CXX $DEFINES -fPIC $CXXFLAGS -c <each of: ${SOURCES//$REPO\//}>" > "$BUILD/command.txt"
fi
aarch64-linux-gnu-readelf -d "$BUILD/$EXT" | grep 'NEEDED.*libgomp.so.1' >/dev/null || { echo "no libgomp.so.1 in $EXT" >&2; exit 1; }

# The package the guest imports: this checkout's fusedtx/ with the aarch64 _C in it, which
# fusedtx/_extension.py imports ahead of any just-in-time build.
STAGE=$WORK/stage
rm -rf "$STAGE"
mkdir -p "$STAGE"
cp -r "$REPO/fusedtx" "$STAGE/fusedtx"
find "$STAGE" \( -name __pycache__ -o -name '_C.*.so' \) -prune -exec rm -rf {} +
cp "$BUILD/$EXT" "$STAGE/fusedtx/$EXT"

# ---------------------------------------------------------------------------------------------
step "6. under qemu-aarch64 -cpu $QEMU_CPU: every native and reference row of tests/output_hashes.py"
# A clean environment (env -i), and Python without site (-S): nothing of the host's Python,
# virtual environment or dist-packages reaches the guest. -E sets the guest's variables only.
# It runs in WORKDIR, not in the checkout, whose fusedtx/ would come first on sys.path.
mkdir -p "$WORK/home"
rm -f "$WORK/compare.txt" "$WORK/arm_hashes.json"
CHECK_START=$(date +%s)
set +e
(cd "$WORK" && env -i PATH=/usr/bin:/bin HOME="$WORK/home" LANG=C.UTF-8 \
    nice -n 10 qemu-aarch64 -cpu "$QEMU_CPU" -L "$SYSROOT" \
    -E LD_LIBRARY_PATH="$STUBS" -E PYTHONPATH="$STAGE:$REPO/tests:$PYROOT" -E HOME="$WORK/home" \
    -E OMP_NUM_THREADS="$THREADS" -E PYTHONUNBUFFERED=1 -E PYTHONDONTWRITEBYTECODE=1 \
    "$PYTHON_ARM" -S - "$REPO/tests/output_hashes.json" "$WORK/arm_hashes.json" "$WORK/compare.txt" $OPS \
    <<'PY'
# Runs in the guest: builds the table with output_hashes.table() and sorts each row into
# portable / not portable, equal / different, against the committed x86-64 table.
import json, platform, sys, time

import torch

import fusedtx._C  # noqa: F401  (here, an ImportError names the symbol or library it lacks)
import fusedtx
import output_hashes

committed, table_out, report_out, *ops = sys.argv[1:]
info = fusedtx.info(file=sys.stderr)
ext = info["extension"]
assert ext["loaded"] and ext["how"] == "ahead-of-time", f"the cross-built fusedtx._C did not load: {ext}"
t0 = time.time()
rows = output_hashes.table(["native", "reference"], ops or None)
seconds = time.time() - t0
with open(table_out, "w") as f:
    json.dump(rows, f, indent=0, sort_keys=True)
    f.write("\n")
with open(committed) as f:
    expected = json.load(f)

def is_portable(key):
    name, backend, dtype = key.split("|")
    return output_hashes.portable(name, backend, dtype)

groups = {}  # (op, backend, dtype) -> [portable, portable equal, other, other equal]
diff_portable, diff_other, new = [], [], []
for key in sorted(rows):
    name, backend, dtype = key.split("|")
    g = groups.setdefault((name.split("/")[0], backend, dtype), [0, 0, 0, 0])
    if key not in expected:
        new.append(key)
        continue
    same = rows[key] == expected[key]
    i = 0 if is_portable(key) else 2
    g[i] += 1
    g[i + 1] += same
    if not same:
        (diff_portable if i == 0 else diff_other).append(f"{key}: x86 {expected[key]} arm {rows[key]}")
missing = sorted(k for k in expected if k not in rows and k.split("|")[1] in ("native", "reference")
                 and (not ops or k.split("/")[0] in ops))
n_port = sum(g[0] for g in groups.values())
n_other = sum(g[2] for g in groups.values())
lines = [
    f"guest: {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__} "
    f"(ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, cxx11 ABI {torch.compiled_with_cxx11_abi()}), "
    f"numpy {__import__('numpy').__version__}, triton {info['triton']}, {torch.get_num_threads()} threads",
    f"fusedtx.info() extension: {ext}",
    f"ops: {' '.join(ops) if ops else 'all'}; backends: native reference; table built in {seconds:.0f} s",
    "",
    f"portable rows compared: {n_port}; equal: {n_port - len(diff_portable)}; different: {len(diff_portable)}",
    *(f"  DIFFERENT {d}" for d in diff_portable),
    f"non-portable rows (host-dependent by design, see output_hashes.portable): {n_other}; "
    f"equal: {n_other - len(diff_other)}; different: {len(diff_other)}",
    *(f"  differs   {d}" for d in diff_other),
    f"rows missing from the aarch64 run: {len(missing)}", *(f"  MISSING {k}" for k in missing),
    f"rows not in the committed table: {len(new)}", *(f"  NEW {k}" for k in new),
    "",
    "per op, backend and dtype: portable equal/compared, non-portable equal/compared",
    *(f"  {op:<18}{backend:<11}{dtype:<10}{g[1]:>3}/{g[0]:<3}{g[3]:>5}/{g[2]}"
      for (op, backend, dtype), g in groups.items()),
]
with open(report_out, "w") as f:
    f.write("\n".join(lines) + "\n")
sys.exit(1 if diff_portable or missing else 0)
PY
) 2> >(tee "$WORK/qemu.log" >&2)
status=$?
set -e
CHECK_SECONDS=$(( $(date +%s) - CHECK_START ))
[[ -s $WORK/compare.txt ]] || { echo "the guest run failed (exit $status): see $WORK/qemu.log" >&2; exit 2; }

# ---------------------------------------------------------------------------------------------
step "7. report -> ${RESULT#$REPO/}"
mkdir -p "$(dirname "$RESULT")"
{
    echo "# fusedtx on aarch64 (qemu-user) against the committed x86-64 output hashes"
    echo "# written by benchmarks/arm_qemu_check.sh; rerun it to refresh"
    echo
    echo "commit: $(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet HEAD -- csrc fusedtx tests || echo ' (with local changes)')"
    echo "host: $(uname -m), $(. /etc/os-release && echo "$PRETTY_NAME"), $(qemu-aarch64 --version | head -1), -cpu $QEMU_CPU"
    echo "cross compiler: $($CXX --version | head -1)"
    echo "extension build: $(cat "$BUILD/command.txt")"
    echo "  link: -shared ${LINK_LIBS//$WORK/WORKDIR} (torch's aarch64 wheel)"
    echo "guest libraries: Debian 12 arm64 python$PY_VERSION; PyPI's aarch64 wheels; its CUDA libraries replaced by stubs"
    echo "reference table: tests/output_hashes.json (x86-64)"
    echo "check under qemu: $CHECK_SECONDS s (import, fusedtx.info(), the table and the comparison);" \
         "this run of the script: $(( $(date +%s) - START )) s (cached steps skipped)"
    cat "$WORK/compare.txt"
} > "$RESULT"
cat "$RESULT"
step "done"
exit $status
