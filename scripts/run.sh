#!/usr/bin/env bash
# One entry point for a fresh machine. Creates or reuses the project venv (.venv, or
# $ANOMALOX_VENV), installs torch==2.13.0 and the other requirements, builds the Rust extension
# into it, then:
#   scripts/run.sh demo    the main job: `anomalox demo` (PatchCore on the ELPV solar cells, HTML report)
#   scripts/run.sh test    the whole test suite: the linters (ruff, mypy, rustfmt, clippy), cargo test
#                          (kernels) and pytest
#   scripts/run.sh lint    only the linters
#   scripts/run.sh setup   only the set-up
set -euo pipefail
cd "$(dirname "$0")/.."
task="${1:-demo}"
shift || true

venv="${ANOMALOX_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating $venv"
    python3 -m venv "$venv"
fi
# torch-sys's build script runs `python` from PATH: the venv must be active.
# shellcheck disable=SC1091
. "$venv/bin/activate"

stamp="$venv/.anomalox-requirements"
if ! cmp -s requirements-dev.txt "$stamp" 2>/dev/null; then
    echo "==> installing requirements (torch==2.13.0 is large: a minute or two)"
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet -r requirements-dev.txt
    cp requirements-dev.txt "$stamp"
fi

echo "==> building the extension (release; a clean build takes a few minutes)"
LIBTORCH_USE_PYTORCH=1 maturin develop --release --quiet

# Settings in pyproject.toml ([tool.ruff], [tool.mypy]). Clippy twice: the kernel crate alone
# (default features, as `cargo test` builds it) and with the bindings (feature `python`, linked
# to the venv's libtorch; `--release` reuses the build scripts' outputs of the release build
# above instead of compiling torch-sys's C++ again). rustfmt and clippy are rustup components of
# the machine's toolchain.
lint() {
    echo "==> ruff check, ruff format --check, mypy, cargo fmt --check, cargo clippy"
    ruff check python tests benches
    ruff format --check python tests benches
    mypy
    if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
        echo "scripts/run.sh: the Rust toolchain lacks rustfmt or clippy: rustup component add rustfmt clippy" >&2
        exit 1
    fi
    cargo fmt --check
    cargo clippy --quiet -- -D warnings
    LIBTORCH_USE_PYTORCH=1 cargo clippy --quiet --release --features python -- -D warnings
}

case "$task" in
    setup) ;;
    demo) python -m anomalox demo "$@" ;;
    lint) lint ;;
    test)
        lint
        echo "==> cargo test (kernels, no Python or libtorch)"
        cargo test --quiet
        echo "==> pytest"
        python -m pytest -q "$@"
        ;;
    *) echo "usage: scripts/run.sh [demo|test|lint|setup] [args...]" >&2; exit 2 ;;
esac
