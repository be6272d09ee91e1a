"""The cached path (eval.kv_cache=true): per client, the prompt prefix that all its examples
share (NI repeats the task's long instruction in every example) is prefilled once; one forward
of the suffixes (each example's prompt rest + answer, right-padded) gives the teacher-forced
loss and argmax and, from the same KV cache, the start of greedy generation. Results equal the
two-prefill path (`generate` + `teacher_forced`) up to float rounding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from flexlora.data.prompts import fit_prompt, tokenize_for_training
from flexlora.data.types import Example
from flexlora.evaluation.generation import STOPS, clean_generation


@dataclass
class _Item:
    """One example's token ids: `full` prompt+answer for teacher forcing (answer from
    `prompt_len` on, labels = full there), `gen` the generation prompt (same as full[:prompt_len]
    unless fit_prompt shortened the two differently)."""

    full: list[int]
    prompt_len: int
    gen: list[int]

    @property
    def shared(self) -> bool:
        return self.gen == self.full[: self.prompt_len]


def _items(examples: list[Example], tokenizer, template: str, cutoff_len: int, max_new_tokens: int) -> list[_Item]:
    items = []
    for ex in examples:
        f = tokenize_for_training(ex, tokenizer, template, cutoff_len, train_on_inputs=False)
        prompt_len = next((i for i, label in enumerate(f["labels"]) if label != -100), len(f["labels"]))
        gen = fit_prompt(ex, tokenizer, template, cutoff_len, max_new_tokens)[1]
        items.append(_Item(list(f["input_ids"]), prompt_len, list(gen)))
    return items


@dataclass
class _Row:
    """One sequence to run: `ids`, the answer from `prompt_len` on (none for a generation-only
    row: prompt_len == len(ids)); `score`: the example's teacher-forced scores come from this
    row; `generate`: its greedy decoding continues from this row's prompt."""

    ids: list[int]
    prompt_len: int
    item: int
    score: bool
    generate: bool


def _rows(items: list[_Item]) -> list[list[_Row]]:
    """Rows in groups that share a prompt prefix: prompt+answer rows (which also start the
    generation when the generation prompt is the same) and generation-only rows (prompts that
    fit_prompt shortened further for generation than for teacher forcing)."""
    scoring = [_Row(it.full, it.prompt_len, k, True, it.shared) for k, it in enumerate(items)]
    generating = [_Row(it.gen, len(it.gen), k, False, True) for k, it in enumerate(items) if not it.shared]
    return [group for group in (scoring, generating) if group]


def common_prefix_len(rows: list[_Row]) -> int:
    """Tokens shared by every row, leaving each prompt at least its last token to run through
    the model (its logits start the answer / the generation)."""
    limit = min(r.prompt_len for r in rows) - 1
    first = rows[0].ids
    n = 0
    while n < limit and all(r.ids[n] == first[n] for r in rows):
        n += 1
    return max(n, 0)


def _plain_greedy(model) -> bool:
    """True when model.generate(do_sample=False) is a plain argmax (no logits processors set in
    the model's generation config), which is what the cached path's decoding loop does."""
    g = getattr(model, "generation_config", None)
    if g is None:
        return True
    return (
        g.repetition_penalty in (None, 1.0)
        and not g.no_repeat_ngram_size
        and not g.bad_words_ids
        and not g.min_new_tokens
        and not g.min_length
        and not g.suppress_tokens
        and not g.begin_suppress_tokens
        and g.forced_bos_token_id is None
        and g.forced_eos_token_id is None
        and not getattr(g, "sequence_bias", None)
    )


def _forward(model, cache, **kwargs):
    """model(...) growing `cache` (a DynamicCache) in place; transformers renamed the argument
    from past_key_values to cache within 5.x."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    return model(use_cache=True, return_dict=True, **{name: cache}, **kwargs)


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@dataclass
class _Pending:
    """Rows ready for greedy decoding: their KV cache, which cache positions are valid
    (`mask`; the rest is another row's answer or padding), where each row's next token sits
    (`position`), the tokens already known to be its greedy output (`accepted`, see _prefill)
    and the next one (`first`)."""

    cache: object
    mask: torch.Tensor
    position: torch.Tensor
    first: torch.Tensor
    accepted: list[list[int]]


@torch.no_grad()
def _prefill(model, tokenizer, units: list[tuple[list[_Row], int]], device, max_new_tokens: int):
    """Two forwards for several groups of rows (`units`: rows and the length of the prompt
    prefix they share): the prefixes, one row each (right-padded, so causal attention keeps
    padding out of every real token), then every row's suffix on its unit's prefix cache (the
    other units' longer prefixes masked out, positions continuing the row's own prefix).
    Returns {(unit, item): (summed answer loss, answer tokens, teacher-forced argmax text)} of
    the scoring rows, the (unit, item) of the generating rows, and their _Pending."""
    pad = tokenizer.pad_token_id
    rows = [row for unit_rows, _ in units for row in unit_rows]
    unit_of = [u for u, (unit_rows, _) in enumerate(units) for _ in unit_rows]
    prefix = [units[u][1] for u in unit_of]  # per row
    longest = max(prefix)
    cache = _new_cache(model)
    if longest:
        heads = torch.full((len(units), longest), pad, dtype=torch.long)
        for u, (unit_rows, p) in enumerate(units):
            heads[u, :p] = torch.tensor(unit_rows[0].ids[:p], dtype=torch.long)
        _forward(model, cache, input_ids=heads.to(device), logits_to_keep=1)
        cache.batch_select_indices(torch.tensor(unit_of, device=device))
    starts = [r.prompt_len - 1 - p for r, p in zip(rows, prefix)]  # suffix position whose logits predict the answer's first token
    n_rows, width = len(rows), max(len(r.ids) - p for r, p in zip(rows, prefix))
    ids = torch.full((n_rows, width), pad, dtype=torch.long)
    row_mask = torch.zeros((n_rows, width), dtype=torch.long)
    labels = torch.full((n_rows, width), -100, dtype=torch.long)  # labels[r, q]: the token suffix position q predicts
    for r, (row, p) in enumerate(zip(rows, prefix)):
        suffix = row.ids[p:]
        ids[r, : len(suffix)] = torch.tensor(suffix)
        row_mask[r, : len(suffix)] = 1
        answer = row.ids[row.prompt_len :]
        if answer:
            labels[r, starts[r] : starts[r] + len(answer)] = torch.tensor(answer, dtype=torch.long)
    ids, row_mask, labels = ids.to(device), row_mask.to(device), labels.to(device)
    prefix_t = torch.tensor(prefix, device=device)
    prefix_mask = (torch.arange(longest, device=device)[None, :] < prefix_t[:, None]).long()
    mask = torch.cat([prefix_mask, row_mask], 1)
    positions = prefix_t[:, None] + torch.arange(width, device=device)[None, :]
    keep = width - min(starts)
    logits = _forward(model, cache, input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    logits = logits[:, -keep:]
    offset = width - keep  # suffix position of logits[:, 0]

    # Teacher forcing, as in `teacher_forced`.
    tf_labels = labels[:, offset:]
    tf_mask = tf_labels != -100
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), tf_labels.clamp(min=0), reduction="none")
    argmax = logits.argmax(-1)
    losses = (loss * tf_mask).sum(1).tolist()
    tokens = tf_mask.sum(1).tolist()
    scored = {
        (unit_of[r], row.item): (
            losses[r],
            tokens[r],
            clean_generation(tokenizer.decode(argmax[r][tf_mask[r]], skip_special_tokens=True)),
        )
        for r, row in enumerate(rows)
        if row.score
    }

    # Decoding continues from the cache. The reference answer is a free draft: as long as the
    # teacher-forced argmax equals the reference token, greedy decoding would have produced that
    # very token in that very context, so those tokens are accepted without a decoding step,
    # and decoding resumes after them (the first mismatch, or the reference's end, is itself
    # the argmax of a context already computed). Row r's valid keys are its own prefix and the
    # suffix up to its prompt's end plus the accepted tokens; the rest (other units' longer
    # prefixes, the remaining answer, padding) is masked out, and new tokens take the row's own
    # next positions (as unpadded generation would).
    gen_rows = [r for r, row in enumerate(rows) if row.generate]
    if not gen_rows:
        return scored, [], None
    accepted_len = []
    for r in gen_rows:
        row, j = rows[r], 0
        answer = row.ids[row.prompt_len :] if row.score else []
        # At most max_new_tokens in all, and never past the reference's last token (its EOS).
        while j < min(len(answer) - 1, max_new_tokens - 1) and int(argmax[r, starts[r] + j - offset]) == answer[j]:
            j += 1
        accepted_len.append(j)
    rows_g = torch.tensor(gen_rows, device=device)
    accepted = [rows[r].ids[rows[r].prompt_len : rows[r].prompt_len + j] for r, j in zip(gen_rows, accepted_len)]
    lengths = torch.tensor([rows[r].prompt_len + j for r, j in zip(gen_rows, accepted_len)], device=device)
    last = torch.tensor([starts[r] + j for r, j in zip(gen_rows, accepted_len)], device=device)
    first = argmax[rows_g, last - offset]
    cache.batch_select_indices(rows_g)
    in_context = torch.arange(width, device=device)[None, :] <= last[:, None]
    valid = torch.cat([prefix_mask[rows_g], in_context.long()], 1)
    return scored, [(unit_of[r], rows[r].item) for r in gen_rows], _Pending(cache, valid, lengths, first, accepted)


def _merge(model, pending: list[_Pending]) -> _Pending:
    """Rows of several chunks in one decoding batch: caches padded (masked) to one length."""
    if len(pending) == 1:
        return pending[0]
    width = max(p.mask.shape[1] for p in pending)
    cache = _new_cache(model)

    def padded(t):  # (rows, heads, length, dim) -> length `width`
        return torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[2]))

    for layer in range(len(pending[0].cache.layers)):
        keys = torch.cat([padded(p.cache.layers[layer].keys) for p in pending])
        values = torch.cat([padded(p.cache.layers[layer].values) for p in pending])
        cache.update(keys, values, layer)
    mask = torch.cat([torch.nn.functional.pad(p.mask, (0, width - p.mask.shape[1])) for p in pending])
    accepted = [a for p in pending for a in p.accepted]
    return _Pending(cache, mask, torch.cat([p.position for p in pending]), torch.cat([p.first for p in pending]), accepted)


@torch.no_grad()
def _decode(model, tokenizer, pending: _Pending, max_new_tokens: int) -> list[str]:
    """Greedy decoding of the rows (what model.generate(do_sample=False) returns, cleaned)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    cache, mask, position, token = pending.cache, pending.mask, pending.position, pending.first
    device = mask.device
    generated: list[list[int]] = [list(a) for a in pending.accepted]
    active = list(range(len(token)))  # rows still decoding, in the cache's row order
    finished = torch.zeros(len(token), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if step:
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long, device=device)], 1)
            logits = _forward(model, cache, input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None]).logits[
                :, -1
            ]
            token = logits.argmax(-1)
            token = torch.where(finished, torch.full_like(token, pad), token)  # as generate pads finished rows
            position = position + 1
        if eos is not None:
            finished = finished | (token == eos)
        done = set()
        for j, (i, t) in enumerate(zip(active, token.tolist())):
            generated[i].append(t)
            # A row is done at EOS, or once its text holds a stop string: clean_generation cuts
            # there, so further tokens could not change the result.
            if (
                finished[j]
                or len(generated[i]) >= max_new_tokens
                or any(stop in tokenizer.decode(generated[i], skip_special_tokens=True) for stop in STOPS)
            ):
                done.add(j)
        if len(done) == len(active):
            break
        if done:  # drop finished rows from the batch
            keep_rows = [j for j in range(len(active)) if j not in done]
            index = torch.tensor(keep_rows, device=device)
            cache.batch_select_indices(index)
            mask, token, position, finished = mask[index], token[index], position[index], finished[index]
            active = [active[j] for j in keep_rows]
    return [clean_generation(tokenizer.decode(g, skip_special_tokens=True)) for g in generated]


def _score_cached(model, tokenizer, work, template, cutoff_len, max_new_tokens, batch_size, decode_batch_size, desc="eval"):
    """Per work item (client, example), in order: (loss, tokens, teacher-forced text, generated
    text). Each client's rows are split into groups sharing a prompt prefix (`_rows`), in
    units of at most batch_size rows; consecutive units fill prefills of up to batch_size rows
    (`_prefill`: two forwards, whatever the number of clients); decoding runs on up to
    decode_batch_size rows at once (a decoding step reads every weight once whatever its
    batch: on a CPU it costs about as much for 64 rows as for 16; its memory is the rows' KV
    cache and one logits row each)."""
    device = next(model.parameters()).device
    tf: list = [None] * len(work)
    generated: list = [None] * len(work)
    groups: list[list[int]] = []
    for k, (client, _) in enumerate(work):
        if groups and work[groups[-1][0]][0] is client:
            groups[-1].append(k)
        else:
            groups.append([k])
    units: list[tuple[list[_Row], int, list[int]]] = []  # rows, shared prefix length, work index of each item
    for group in groups:
        items = _items([work[k][1] for k in group], tokenizer, template, cutoff_len, max_new_tokens)
        for rows in _rows(items):
            prefix_len = common_prefix_len(rows)
            units.extend((rows[n : n + batch_size], prefix_len, group) for n in range(0, len(rows), batch_size))
    pools: list[list] = []
    for unit in units:
        if pools and sum(len(u[0]) for u in pools[-1]) + len(unit[0]) <= batch_size:
            pools[-1].append(unit)
        else:
            pools.append([unit])
    waiting: list[tuple[list[int], _Pending]] = []

    def flush():
        if waiting:
            texts = _decode(model, tokenizer, _merge(model, [p for _, p in waiting]), max_new_tokens)
            for k, text in zip([k for ks, _ in waiting for k in ks], texts):
                generated[k] = text
            waiting.clear()

    for pool in tqdm(pools, desc=desc, leave=False, unit="batch"):
        scored, gen_items, pending = _prefill(model, tokenizer, [(rows, p) for rows, p, _ in pool], device, max_new_tokens)
        for (u, i), r in scored.items():
            tf[pool[u][2][i]] = r
        if pending is None:
            continue
        if sum(len(ks) for ks, _ in waiting) + len(gen_items) > decode_batch_size:
            flush()
        waiting.append(([pool[u][2][i] for u, i in gen_items], pending))
    flush()
    return [(*t, g) for t, g in zip(tf, generated)]
