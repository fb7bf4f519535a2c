"""Bayes-rule guidance: a conditioned model steering its own samples toward the rating asked for.

A conditioned model is its own generative classifier (raylstm.classify, Lipton et al. 2015): read the
text so far under every rating and Bayes' rule gives P(rating | text so far). Guided sampling (GeDi,
Krause et al. 2020; classifier-free guidance for language models, Sanchez et al. 2023) scores each next
character x both by how likely the asked-for rating r* makes it and by how far it moves that posterior:

    log p_w(x) = log P(x | prefix, r*) + w * log P(r* | prefix + x)                 (renormalised over x)

    log P(r* | prefix + x) = log P(r* | prefix) + log P(x | prefix, r*)
                             - log sum_r P(r | prefix) P(x | prefix, r)             (Bayes' rule, one char)

P(r | "") is the training split's frequency of r given the row's other conditions (ConditionVocab.prior
over classify.candidate_conditions, the prior of classify.posterior); the prompt's characters update it
like generated ones, so at the end the running posterior is classify.posterior's for "\\n" + text + "\\n"
(when the prompt is "\\n" and the sample ends at its "\\n"). w = 0 is the plain conditioned sampler: the
same scores, the same random stream (sample.uniforms), the same choose_next, so the same seed writes the
same text. Temperature, top-k, top-p and min-p apply to the guided scores as to plain ones.

    row b asks (r*, c) --candidate_conditions--> K candidates (r, c), r = 1..5 (x every category when c
        is missing); plus the row's own ids when they are not one of them
    model rows [M = sum of K + own] --prompt, then one step per character; every model row of a sample
        is fed the character that sample chose--> logits [M, V]
    joint [M] = log P(candidate) + log P(text so far | candidate)           (float64, the Bayes state)
    scores [B, V] = own logits (unknown id masked, as Sampler.scores) + w * (lse over r* candidates
        - lse over all candidates) of joint + log_softmax(logits)

Cost: M/B model rows stepped per generated character: 5 with a known category (the row's own ids are
one of the 5 candidates), 5 x categories + 1 without one; `GuidedBatch.row_steps` counts them.

Only what guidance needs is supported: full-state models (not seed windows), no penalties, logit_bias,
logprobs or steering with it (refused naming `guidance`). Not in the HTTP API (yet).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import numpy as np
import torch

from raylstm.classify import Posterior, candidate_conditions
from raylstm.sample import (
    Completion,
    Row,
    SampleParamError,
    SampleParams,
    Sampler,
    _eval_mode,
    choose_next,
    uniforms,
)

MAX_GUIDANCE = 100.0


def check_guided(sampler: Sampler, params: SampleParams, guidance: float, field: str = "rating") -> None:
    """Refuse (SampleParamError naming the field) what guided sampling cannot do."""
    if not (math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise SampleParamError(
            "guidance", f"guidance must be a number in [0, {MAX_GUIDANCE:g}], got {guidance}"
        )
    if sampler.conditions is None or field not in sampler.conditions.fields:
        raise SampleParamError(
            "guidance", f"guidance needs a model conditioned on {field!r} (with its condition vocabulary)"
        )
    if sampler.window is not None:
        raise SampleParamError("guidance", "guidance needs a full-state model (not seed windows)")
    sampler.check_params(params)
    if params.condition_map.get(field) is None:
        raise SampleParamError("guidance", f"guidance needs a {field} to guide toward (--{field})")
    for name, used in (
        ("penalties", params.penalized),
        ("logit_bias", bool(params.bias_items)),
        ("logprobs", params.logprobs is not None),
        ("prompt_logprobs", params.prompt_logprobs is not None),
        ("steer_sentiment", params.steer_sentiment is not None),
    ):
        if used:
            raise SampleParamError("guidance", f"guidance does not combine with {name}")


class GuidedBatch:
    """Rows being generated with guidance `w` toward their own value of `field`, all stepped together."""

    def __init__(self, sampler: Sampler, rows: Sequence[Row], guidance: float, field: str = "rating") -> None:
        conds = sampler.conditions
        assert conds is not None  # check_guided
        self.sampler, self.rows, self.w, self.field = sampler, list(rows), float(guidance), field
        self.values = list(conds.values[field])
        target = conds.fields.index(field)
        cond_rows: list[list[int]] = []
        joint0: list[float] = []
        owner: list[int] = []
        own: list[int] = []
        cands: list[list[int]] = []
        cand_value: list[list[int]] = []
        for b, r in enumerate(self.rows):
            assert r.cond is not None
            known = list(r.cond)
            known[target] = 0
            combos, log_prior = candidate_conditions(conds, field, known)
            idx = []
            for c, lp in zip(combos.tolist(), log_prior.tolist()):
                idx.append(len(cond_rows))
                cond_rows.append(c)
                joint0.append(lp)
                owner.append(b)
            cands.append(idx)
            cand_value.append([c[target] - 1 for c in combos.tolist()])
            mine = [i for i in idx if cond_rows[i] == list(r.cond)]
            if mine:
                own.append(mine[0])
            else:  # a field left missing: the row's own ids are read too (what the plain sampler reads)
                own.append(len(cond_rows))
                cond_rows.append(list(r.cond))
                joint0.append(-math.inf)  # not a candidate: it never enters the sums
                owner.append(b)
        M, K = len(cond_rows), max(map(len, cands))
        self.cond = torch.tensor(cond_rows, dtype=torch.long)
        self.joint = torch.tensor(joint0, dtype=torch.float64)
        self.owner = torch.tensor(owner, dtype=torch.long)
        self.own = torch.tensor(own, dtype=torch.long)
        # [B, K] candidate model rows, padded with M (a row of -inf appended when gathering)
        self.cand = torch.tensor([c + [M] * (K - len(c)) for c in cands], dtype=torch.long)
        self.cand_value = torch.tensor([v + [-1] * (K - len(v)) for v in cand_value], dtype=torch.long)
        want = torch.tensor([r.cond[target] - 1 for r in self.rows], dtype=torch.long)
        self.is_target = self.cand_value == want[:, None]
        self.seeds = np.array([r.seed for r in self.rows], dtype=np.uint64)
        self.row_steps = 0  # model rows stepped (one character each), prompts included
        self._prefill()

    def _model(self, ids: torch.Tensor, state, cond: torch.Tensor):
        dev = self.sampler.device
        return self.sampler.model(ids.to(dev), state, cond.to(dev))

    def _prefill(self) -> None:
        """Every model row reads its sample's prompt under its own ids; the prompt's characters after the
        first enter the joint as generated ones do (classify scores a review from its leading "\\n")."""
        M = len(self.cond)
        prompts = [self.rows[b].prompt.ids for b in self.owner.tolist()]
        by_len: dict[int, list[int]] = {}
        for m, p in enumerate(prompts):
            by_len.setdefault(len(p), []).append(m)
        h = c = None
        logits = None
        for T, idx in by_len.items():
            sel = torch.tensor(idx)
            ids = torch.tensor([prompts[m] for m in idx], dtype=torch.long)
            out, (hh, cc) = self._model(ids, None, self.cond[sel])
            if h is None:
                h = hh.new_zeros(hh.shape[0], M, hh.shape[2])
                c = cc.new_zeros(cc.shape[0], M, cc.shape[2])
                logits = out.new_zeros(M, out.shape[-1])
            h[:, sel.to(h.device)] = hh
            c[:, sel.to(c.device)] = cc
            logits[sel.to(logits.device)] = out[:, -1]
            if T > 1:
                lp = torch.log_softmax(out[:, :-1].to("cpu", torch.float64), dim=-1)
                got = lp.gather(2, ids[:, 1:, None]).squeeze(2).sum(1)
                self.joint[sel] += got
            self.row_steps += len(idx) * T
        self.h, self.c, self.logits = h, c, logits
        self._lp: torch.Tensor | None = None

    def alive(self) -> list[int]:
        return [b for b, r in enumerate(self.rows) if not r.finished]

    @torch.inference_mode()
    def scores(self, rows: Sequence[int] | None = None) -> torch.Tensor:
        """The guided scores [len(rows), V] (float64, before temperature) of sample rows `rows` (default:
        the unfinished ones): their own logits with the unknown id masked (Sampler.scores of a row with no
        bias or penalties) plus w x log P(r* | prefix + x) for every next character x."""
        b = torch.tensor(self.alive() if rows is None else list(rows), dtype=torch.long)
        z = self.logits[self.own[b]].to("cpu", torch.float64)
        z[:, self.sampler.vocab.unk_id] = -math.inf
        self._lp = torch.log_softmax(self.logits.to("cpu", torch.float64), dim=-1)  # [M, V]
        if self.w == 0:
            return z
        new = self.joint[:, None] + self._lp  # [M, V]: the joint after each possible next character
        new = torch.cat([new, new.new_full((1, new.shape[1]), -math.inf)])
        g = new[self.cand[b]]  # [B, K, V]
        num = torch.logsumexp(g.masked_fill(~self.is_target[b][..., None], -math.inf), dim=1)
        den = torch.logsumexp(g, dim=1)
        return z + self.w * (num - den)

    @torch.inference_mode()
    def step(self) -> None:
        """One character for every unfinished row: sampled from the guided scores with the row's own
        random stream, pushed to the row (stop strings, max_chars), entered into every candidate's joint,
        and fed to the model rows of the rows that go on."""
        a = self.alive()
        if not a:
            return
        z = self.scores(a)
        assert self._lp is not None
        rows = [self.rows[i] for i in a]

        def vec(name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
            return torch.tensor([getattr(r.params, name) for r in rows], dtype=dtype)

        draws = np.array([r.n_chars for r in rows], dtype=np.uint64)
        u = torch.from_numpy(uniforms(self.seeds[a], draws))
        truncate = any(r.params.truncated for r in rows)
        nxt = choose_next(
            z, vec("temperature"), vec("top_k", torch.long), vec("top_p"), vec("min_p"), u, truncate
        )
        logprobs = torch.log_softmax(z, dim=-1).gather(1, nxt[:, None]).squeeze(1).tolist()
        chosen = torch.full((len(self.rows),), -1, dtype=torch.long)
        chosen[torch.tensor(a)] = nxt
        for r, t, lp in zip(rows, nxt.tolist(), logprobs):
            r.push(self.sampler.itos[t], lp, None)
        # Bayes' rule: every candidate of a row that chose a character takes that character's logprob.
        m = (chosen[self.owner] >= 0).nonzero().squeeze(1)
        x = chosen[self.owner[m]]
        self.joint[m] += self._lp[m, x]
        going = torch.tensor([not self.rows[b].finished for b in self.owner[m].tolist()], dtype=torch.bool)
        m, x = m[going], x[going]
        if len(m):
            dev = self.h.device
            md = m.to(dev)
            out, (h, c) = self._model(x[:, None], (self.h[:, md], self.c[:, md]), self.cond[m])
            self.h[:, md], self.c[:, md] = h, c
            self.logits[md] = out[:, -1]
            self.row_steps += len(m)

    def run(self) -> GuidedBatch:
        while self.alive():
            self.step()
        return self

    @torch.inference_mode()
    def posterior(self) -> Posterior:
        """P(field | the text so far) for every row (the prompt's characters and every one chosen,
        its stop string included): Bayes' rule over the candidates' joints, summed per value."""
        new = torch.cat([self.joint, self.joint.new_full((1,), -math.inf)])[self.cand]  # [B, K]
        out = torch.stack(
            [
                torch.logsumexp(new.masked_fill(self.cand_value != v, -math.inf), dim=1)
                for v in range(len(self.values))
            ],
            dim=1,
        )
        probs = torch.softmax(out, dim=1).numpy()
        return Posterior(self.field, self.values, probs)

    def completions(self, n: int = 1) -> list[list[Completion]]:
        """The rows' results, n per prompt in the order they were started."""
        res = [r.result() for r in self.rows]
        return [res[i : i + n] for i in range(0, len(res), n)]


def start_guided(
    sampler: Sampler,
    prompts: Sequence[str],
    params: SampleParams | Sequence[SampleParams],
    guidance: float,
    n: int = 1,
    field: str = "rating",
) -> GuidedBatch:
    """Rows for every prompt (each with its own params), n each with seeds seed+0 .. seed+n-1 (as
    Sampler.start), read through their prompts and ready to step."""
    if isinstance(params, SampleParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} parameter sets")
    rows = []
    for prompt, p in zip(prompts, params):
        check_guided(sampler, p, guidance, field)
        prepared = sampler.prepare_prompt(prompt, p.clean_prompt)
        base = p.seed if p.seed is not None else secrets.randbits(62)
        rows += [Row(sampler, p, base + i, i, prepared) for i in range(n)]
    with torch.inference_mode():
        return GuidedBatch(sampler, rows, guidance, field)


def generate_guided(
    sampler: Sampler,
    prompts: Sequence[str],
    params: SampleParams | Sequence[SampleParams],
    guidance: float,
    n: int = 1,
    field: str = "rating",
) -> list[list[Completion]]:
    """Sampler.generate with guidance `guidance` toward each row's own `field` value (module doc); with
    guidance 0 it writes exactly what Sampler.generate writes for the same seeds."""
    with _eval_mode(sampler.model):
        return start_guided(sampler, prompts, params, guidance, n, field).run().completions(n)
