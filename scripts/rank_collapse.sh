#!/usr/bin/env bash
# The rank-collapse study of issue 20 (part 2): does the energy of the global update beyond the
# rank every client shares fall geometrically under FlexLoRA's SVD redistribution (raFLoRA's claim,
# arXiv 2602.13486), and does raFLoRA's rank-partitioned rule avoid it?
#
# FlexLoRA, raFLoRA and HetLoRA x heavy-tail-light, heavy-tail-strong, seed 0, 10 rounds, on the
# shared NI sample with SmolLM2 and the data settings of scripts/compare_ni.sh (same held-out
# categories, clients per round, local steps); held-out Rouge-L at round 0 and round 10 only
# (eval.every=10). Every round logs the global ΔW's spectrum (metrics.jsonl "spectrum":
# eval.spectrum, on by default): the energy share per rank band of the clients' ranks and the
# effective rank, per module kind.
#
# A `flexlora compare` grid: each run in its own folder $OUT/cells/<method>-<profile>-seed0/;
# rerun to resume (finished cells are skipped, an interrupted cell continues from its round
# checkpoint). The grid report ($OUT/compare.md) sets raFLoRA and HetLoRA against FlexLoRA with
# paired intervals (--baseline flexlora); then $OUT/rank_collapse.md and .png summarise the
# spectra (flexlora rank-report). Run from the repository root with ../shared beside it.
#
# Environment: OUT, METHODS, PROFILES, SEEDS, FLEXLORA; extra arguments are key=value
# overrides for every cell (e.g. a short check: model=tiny-llama federation.rounds=2).
set -euo pipefail
cd "$(dirname "$0")/.."
FLEXLORA=${FLEXLORA:-.venv/bin/flexlora}
OUT=${OUT:-runs/rank_collapse}
"$FLEXLORA" compare --out "$OUT" \
  --methods "${METHODS:-flexlora,raflora,hetlora}" --profiles "${PROFILES:-heavy-tail-light,heavy-tail-strong}" \
  --seeds "${SEEDS:-0}" --baseline flexlora \
  data.source=natural-instructions data.path=../shared/data/natural-instructions-1613-mini \
  "data.heldout_categories=[Toxic Language Detection, Misc., Cause Effect Classification, Information Extraction, Textual Entailment, Wrong Candidate Generation, Named Entity Recognition, Commonsense Classification, Fill in The Blank]" \
  eval.max_examples_per_client=2 federation.rounds=10 federation.clients_per_round=6 \
  train.steps=6 train.batch_size=4 train.lr=1e-3 eval.every=10 eval.spectrum=true "$@"
"$FLEXLORA" rank-report "$OUT" --out "$OUT" --rounds 1,5,10
