#!/usr/bin/env bash
# The privacy-utility grid of docs/privacy.md ("What privacy costs, measured"): FlexLoRA, FedIT
# and FFA-LoRA on Dolly-15k with SmolLM2, one seed, at noise multipliers fixed before any run.
# Run from the repository root with ../shared beside it; rerun to resume (finished cells are
# skipped). About 5 minutes a cell on a busy 2-core CPU (one round of 4 of 20 clients).
#
#   1. calibration: privacy on, clipping at C = 10⁹ (records the norms, clips none), no noise,
#      one test example per category
#      (docs/privacy_grid/calibration): records each client's change norm (metrics.jsonl,
#      privacy.update_norms) in each method's space. One round: the grid's own clients and
#      training, so that C clips about half of the clients of the σ = 0 cell;
#   2. C per method = the median of those norms (a data-dependent choice: it spends privacy the
#      accountant does not count, see "What is guaranteed");
#   3. for σ in SIGMAS (in this order), one grid per method: docs/privacy_grid/sigma-σ/METHOD,
#      privacy.clipping_norm=C(METHOD), privacy.noise_multiplier=σ. σ = 0 is clipping alone.
# Each grid reuses the first grid's zero_shot.json (the same base model, data and evaluation).
# COMMIT=1 commits each grid's run files as it lands (never checkpoint/ or adapter/).
set -euo pipefail
FLEXLORA=${FLEXLORA:-flexlora}
SIGMAS=${SIGMAS:-0 1 0.1}
METHODS=${METHODS:-flexlora fedit ffa}
GRID=docs/privacy_grid
COMMON=(
  data.source=dolly data.path=../shared/data/dolly-15k
  data.test_path=../shared/data/dolly-15k/test-10-per-category.json data.num_clients=20
  eval.max_examples_per_client=6 eval.every=2 federation.rounds=1 federation.clients_per_round=4
  train.steps=3 train.batch_size=2 train.lr=1e-3 privacy.enabled=true
)
RUN_FILES="clients.json config.yaml data.json metric.png metrics.jsonl rank_energy.png summary.json"

commit() {  # $1: a grid folder
  [ "${COMMIT:-0}" = 1 ] || return 0
  local files=("$1"/grid.json "$1"/zero_shot.json "$1"/compare.* "$1"/*.csv "$1"/*.png)
  for cell in "$1"/cells/*/; do for f in $RUN_FILES error.txt; do files+=("$cell$f"); done; done
  local present=()
  for f in "${files[@]}"; do [ -f "$f" ] && present+=("$f"); done
  git add -- "${present[@]}" && git commit -q -m "privacy grid: $1" -- "${present[@]}" || true
}

$FLEXLORA compare --methods "$(echo $METHODS | tr ' ' ,)" --profiles heavy-tail-light --seeds 0 \
  --out $GRID/calibration "${COMMON[@]}" eval.max_examples_per_client=1 privacy.clipping_norm=1e9
commit $GRID/calibration

median_norm() {  # the median change norm of METHOD's calibration cell, over its clients
  ${PYTHON:-python3} - "$GRID/calibration/cells" "$1" <<'EOF'
import json, pathlib, statistics, sys
cell = next(pathlib.Path(sys.argv[1]).glob(f"{sys.argv[2]}-*-seed0"))
norms = [n for line in (cell / "metrics.jsonl").read_text().splitlines()
         for n in json.loads(line).get("privacy", {}).get("update_norms", {}).values()]
print(f"{statistics.median(norms):.6g}")
EOF
}

for sigma in $SIGMAS; do
  for method in $METHODS; do
    out=$GRID/sigma-$sigma/$method
    C=$(median_norm "$method")
    mkdir -p "$out"
    zero=$(ls $GRID/sigma-*/*/zero_shot.json 2>/dev/null | head -1 || true)
    [ -f "$out/zero_shot.json" ] || [ -z "$zero" ] || cp "$zero" "$out/"
    echo "privacy grid: $method sigma=$sigma C=$C"
    $FLEXLORA compare --methods "$method" --profiles heavy-tail-light --seeds 0 --out "$out" "${COMMON[@]}" \
      privacy.clipping_norm="$C" privacy.noise_multiplier="$sigma" || echo "privacy grid: $out failed"
    commit "$out"
  done
done
