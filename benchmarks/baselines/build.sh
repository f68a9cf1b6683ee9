#!/usr/bin/env bash
# Builds the llama.cpp baselines of the performance benchmarks (`make bench-deps`), never
# part of `make test`:
#   - llama-cpp-python 0.3.36 into the project's venv, from source with AMX off (its default
#     native build crashes at the first eval on this CPU: ../shared/FACTS.md);
#   - llama-server from the llama.cpp tree that the same source distribution carries
#     (vendor/llama.cpp), same flags, into .bench/llama.cpp/build/bin.
# Each step is skipped when its output exists, so the target is idempotent. About 10
# minutes each on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
VERSION=0.3.36
OUT=.bench
GGML_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VNNI=ON \
-DGGML_AVX512_VBMI=ON -DGGML_AVX2=ON -DGGML_AVX=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
JOBS=$(nproc)

server_bin="$OUT/llama.cpp/build/bin/llama-server"
if [ ! -x "$server_bin" ]; then
  echo "== llama-server: source of llama-cpp-python $VERSION (vendor/llama.cpp)"
  mkdir -p "$OUT/sdist"
  "$VENV/bin/pip" download --quiet --no-deps --no-binary :all: \
    "llama-cpp-python==$VERSION" -d "$OUT/sdist"
  rm -rf "$OUT/llama.cpp" "$OUT/unpack"
  mkdir -p "$OUT/unpack"
  tar -xzf "$OUT/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$OUT/unpack"
  mv "$OUT/unpack/llama_cpp_python-$VERSION/vendor/llama.cpp" "$OUT/llama.cpp"
  rm -rf "$OUT/unpack"
  # LLAMA_USE_PREBUILT_UI=OFF: by default the build downloads the server's web UI, which
  # fails offline.
  # shellcheck disable=SC2086
  cmake -S "$OUT/llama.cpp" -B "$OUT/llama.cpp/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    $GGML_FLAGS -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF
  echo "== llama-server: building (about 10 minutes on 2 cores)"
  cmake --build "$OUT/llama.cpp/build" --target llama-server -j "$JOBS"
fi
"$server_bin" --version 2>&1 | head -n 2

if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "== llama-cpp-python $VERSION: building from source, AMX off (about 10 minutes)"
  CMAKE_ARGS="$GGML_FLAGS" "$VENV/bin/pip" install --no-cache-dir --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION"
fi
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
