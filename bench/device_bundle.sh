#!/usr/bin/env bash
# `make device-bundle`: what a GPU machine that cannot reach PyPI lacks, fetched here into .device/ (git-ignored),
# so that `bash bench/device_check.sh` runs there in one command.
#   bash bench/device_bundle.sh [DIR]       # default .device
# What it lacks: every requirement of this package and of DeepSpeed, followed down from .venv's installed
# metadata (so a new dependency is never missed), that the machine's image does not hold (IMAGE_HAS below,
# from the device tool's list of its packages: torch with CUDA and its own dependencies, numpy, ninja, ...;
# torch's own requirements are not followed). At .venv's versions, so the device runs the stack `make test`
# runs. Binary wheels for the device's Python; a pure-Python source package (antlr4 4.9.3) as a wheel built
# here; DeepSpeed as its source package, built there against the device's torch.
#   DEVICE_PYTHON_VERSION   the device's Python (default 3.12: its python3)
#   DEVICE_PLATFORMS        manylinux tags pip may match there (default: x86_64, glibc 2.17 to 2.28)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.device}
venv=${VENV:-.venv}
python_version=${DEVICE_PYTHON_VERSION:-3.12}
platforms=${DEVICE_PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64}
# Held by the GPU image (/work/.library/device/KINDS.md), among what this package and DeepSpeed need.
# typing-extensions is not listed: pydantic wants a recent one, so it travels whatever the image's.
IMAGE_HAS="torch numpy ninja psutil py-cpuinfo msgpack einops nvidia-ml-py pyyaml safetensors tqdm packaging
           setuptools wheel pytest huggingface-hub filelock fsspec"
[[ -x $venv/bin/python ]] || { echo "device_bundle: $venv is missing: run \`make test\` first (or set VENV)" >&2; exit 2; }

# name==version of each requirement to bring, from the metadata of what .venv has installed.
needed=$("$venv/bin/python" - "$IMAGE_HAS" <<'EOF'
import sys
from importlib.metadata import distribution
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

image = {canonicalize_name(n) for n in sys.argv[1].split()}
seen, todo = set(), ["wenet_hooks", "deepspeed", "typing-extensions"]
while todo:
    name = canonicalize_name(todo.pop())
    if name in seen or name in image:
        continue
    seen.add(name)
    dist = distribution(name)  # raises where .venv lacks it: the bundle would be incomplete
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            todo.append(req.name)
for name in sorted(seen - {"wenet-hooks"}):
    print(f"{name}=={distribution(name).version}")
EOF
)
echo "device_bundle: bringing $(echo $needed | tr '\n' ' ')"
rm -rf "$dir.partial"
mkdir -p "$dir.partial/wheels" "$dir.partial/sdist"
platform_args=()
for platform in $platforms; do platform_args+=(--platform "$platform"); done
pip=("$venv/bin/pip" -q --disable-pip-version-check)
for requirement in $needed; do
  case $requirement in
    deepspeed==*)  # imports torch while it builds: built there
      "${pip[@]}" download --no-deps --no-binary=:all: -d "$dir.partial/sdist" "$requirement" ;;
    *)
      if ! "${pip[@]}" download --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
             "${platform_args[@]}" -d "$dir.partial/wheels" "$requirement" 2>/dev/null; then
        # A source package only (antlr4-python3-runtime 4.9.3): a wheel built here, if pure Python.
        "${pip[@]}" wheel --no-deps -w "$dir.partial/wheels" "$requirement"
      fi ;;
  esac
done
if ls "$dir.partial"/wheels/*.whl | grep -Ev -- '-(py3-none-any|cp'"${python_version/./}"'-[^/]*)\.whl$'; then
  echo "device_bundle: the wheels above would not install on Python $python_version" >&2
  exit 1
fi
rm -rf "$dir"
mv "$dir.partial" "$dir"
ls "$dir"/wheels "$dir"/sdist
du -sh "$dir"
