#!/usr/bin/env bash
# The NI comparison grid of docs/compare_ni/ (issue 9): FedIT (homogeneous), FlexLoRA, HetLoRA
# and FLoRA x heavy-tail-light, heavy-tail-strong x seeds 0-2 on the shared NI sample with SmolLM2.
# Run from the repository root with ../shared beside it; rerun to resume (finished cells are
# skipped, an interrupted cell continues from its round checkpoint). Several hours on 2 cores.
#
# Held-out (never trained on) task categories: every category of the sample with 20 to 40
# clients, a rule fixed before any run (9 categories, 259 clients; 2 test examples each).
set -euo pipefail
cd "$(dirname "$0")/.."
FLEXLORA=${FLEXLORA:-.venv/bin/flexlora}
exec "$FLEXLORA" compare --out docs/compare_ni \
  --methods fedit,flexlora,hetlora,flora --profiles heavy-tail-light,heavy-tail-strong --seeds 0,1,2 \
  data.source=natural-instructions data.path=../shared/data/natural-instructions-1613-mini \
  "data.heldout_categories=[Toxic Language Detection, Misc., Cause Effect Classification, Information Extraction, Textual Entailment, Wrong Candidate Generation, Named Entity Recognition, Commonsense Classification, Fill in The Blank]" \
  eval.max_examples_per_client=2 federation.rounds=5 federation.clients_per_round=6 \
  train.steps=6 train.batch_size=4 train.lr=1e-3 eval.every=5 "$@"
