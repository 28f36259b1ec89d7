"""Reading the model and searching with it, for ``Context``: the next-token distribution
(``next_distribution``), teacher-forced log-probabilities (``score``), beam search over
forks (``beam_search``) and drafts verified in one pass (``generate_speculative``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from inferlet import _kv
from inferlet._context_base import _ContextBase
from inferlet._loop import gather, wait_for
from inferlet._wit import unwrap
from inferlet.sampler import Greedy
from inferlet.stop import Stop

if TYPE_CHECKING:
    from inferlet.context import Context, Drafter


class _SearchMixin(_ContextBase):
    """``next_distribution``, ``score``, ``beam_search`` and ``generate_speculative`` of
    ``Context``."""

    async def next_distribution(self, k: int = 32) -> list[tuple[int, float]]:
        """The top-``k`` next-token distribution after the pending tokens (descending).

        The tokens are written to the KV cache; nothing is appended: pick a token and
        ``fill_tokens([t])`` it."""
        await self._follow()
        self._check_open()
        self._repend()
        out = unwrap(await wait_for(self._submit("distribution", k)))
        self._check_flushes()
        return list(zip(out.dist_ids, out.dist_probs, strict=True))

    async def score(self, continuation: list[int]) -> list[float]:
        """The log-probability of each token of ``continuation`` after this context and
        the tokens before it (teacher forcing), in one pass; the tokens are appended."""
        if not continuation:
            return []
        await self._follow()
        self._check_open()
        self._repend()
        first = len(self.pending) - 1  # the row that predicts continuation[0]
        inputs = self.pending + continuation[:-1]
        positions = list(range(self.written, self.written + len(inputs)))
        wanted = [(first + i, "forced", t) for i, t in enumerate(continuation)]
        fut = self._pass(inputs, positions, None, wanted)
        self.tokens += continuation
        self.written += len(inputs)
        out = unwrap(await wait_for(fut))
        self._check_flushes()
        return [float(x) for x in out.logprobs]

    # ----- search -----

    async def beam_search(
        self,
        beam_size: int,
        max_tokens: int,
        *,
        stop: Stop | None = None,
        allowed: Iterable[int] | None = None,
    ) -> list[tuple[list[int], float]]:
        """The ``beam_size`` best continuations by total log-probability, best first.

        Each step asks every beam for its top-``beam_size`` distribution in one batch
        (``gather``), keeps the best ``beam_size`` extensions, and forks the kept beams
        (shared full pages). ``allowed`` restricts the tokens a beam may take (their
        log-probabilities stay those of the unrestricted model). Returns ``(tokens,
        logprob)`` pairs; ``self`` is unchanged."""
        if beam_size < 1 or max_tokens < 1:
            raise ValueError("beam_size and max_tokens must be >= 1")
        cond = stop or Stop()
        eos = set(cond.token_ids) | (set(self.model.eos_tokens) if cond.at_eos else set())
        ok = None if allowed is None else set(allowed)
        # Restricted: the whole distribution, filtered here (the top-k of the model
        # need not hold any allowed token).
        k = beam_size if ok is None else self.model.tokenizer.vocab_size
        beams: list[tuple[Context, list[int], float]] = [(self.fork(), [], 0.0)]
        done: list[tuple[list[int], float]] = []
        for _ in range(max_tokens):
            dists = await gather(*(c.next_distribution(k) for c, _, _ in beams))
            if ok is not None:
                dists = [[(t, p) for t, p in d if t in ok] for d in dists]
            cands = [
                (score + math.log(max(p, 1e-30)), b, tok)
                for b, ((_, _, score), dist) in enumerate(zip(beams, dists, strict=True))
                for tok, p in dist
            ]
            cands.sort(key=lambda c: -c[0])
            kept: list[tuple[Context, list[int], float]] = []
            for score, b, tok in cands[:beam_size]:
                parent, toks = beams[b][0], beams[b][1]
                if tok in eos:
                    done.append(([*toks, tok], score))
                    continue
                child = parent.fork()
                child.fill_tokens([tok])
                kept.append((child, [*toks, tok], score))
            for c, _, _ in beams:
                c.release()
            beams = kept
            if not beams:
                break
        out = done + [(toks, score) for _, toks, score in beams]
        for c, _, _ in beams:
            c.release()
        out.sort(key=lambda b: -b[1])
        return out[:beam_size]

    async def generate_speculative(self, drafter: Drafter, max_tokens: int) -> list[int]:
        """Greedy generation verified against a drafter's guesses; returns the new tokens.

        A draft is a chain (``list[int]``) or a tree (``list[(token, parent)]``, parent
        -1 for the root, parents listed before children). Each step feeds the pending
        tokens plus every draft node in one pass, each node attending only to its own
        ancestors (an attention mask), and asks for the model's greedy token after each.
        The path of drafts the model agrees with is kept, plus the model's own next
        token, so the output equals plain greedy decoding while a good drafter yields
        several tokens per pass. KV of the accepted nodes stored in draft order is kept;
        the rest is re-fed with the next pass."""
        await self._follow()
        self._check_open()
        self._repend()
        out: list[int] = []
        while len(out) < max_tokens:
            nodes = _kv.draft_tree(drafter.draft(list(self.tokens)))
            base_written, base_slots, n_pending = self.written, self.kv_len, len(self.pending)
            if not n_pending:
                raise ValueError("nothing to continue from: fill tokens first")
            res = unwrap(await wait_for(self._submit_tree(nodes)))
            self._check_flushes()
            preds = [int(t) for t in res.tokens]  # after the last pending token, then per node
            path: list[int] = []  # accepted node indices, root to leaf
            pred, parent = preds[0], -1
            while True:
                child = next((i for i, (tok, par) in enumerate(nodes)
                              if par == parent and tok == pred), None)  # fmt: skip
                if child is None:
                    break
                path.append(child)
                pred, parent = preds[1 + child], child
            new = [nodes[i][0] for i in path] + [pred]
            stored = 0  # accepted nodes whose slots sit right after the pending tokens
            while stored < len(path) and path[stored] == stored:
                stored += 1
            self.slot_pos = self.slot_pos[: base_slots + n_pending + stored]
            self.written = base_written + n_pending + stored
            del self.tokens[base_written + n_pending :]
            self.tokens += new
            out += new
            drafter.feedback(len(path), len(nodes))
            observe = getattr(drafter, "observe", None)
            if observe is not None:  # (Jacobi-style drafters guess from the predictions)
                observe(preds)
        extra = len(out) - max_tokens
        if extra > 0:  # the last step may overshoot: give the surplus back
            del out[max_tokens:]
            keep = len(self.tokens) - extra
            del self.tokens[keep:]
            if self.written > keep - 1:
                cut = self.written - (keep - 1)
                self.slot_pos = self.slot_pos[: len(self.slot_pos) - cut]
                self.written = keep - 1
        return out

    def _submit_tree(self, nodes: list[tuple[int, int]]) -> Any:
        """One pass over the pending tokens and a draft tree, each node attending to its
        ancestors only; greedy outputs after the last pending token and every node."""
        pending = self.pending
        vocab = self.model.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t, _ in nodes):
            raise ValueError("draft token out of range")
        n_p, ctx = len(pending), self.kv_len
        depth: list[int] = []
        for _, par in nodes:
            depth.append(0 if par < 0 else depth[par] + 1)
        base = self.written + n_p  # position of the first draft level
        positions = list(range(self.written, base)) + [base + d for d in depth]
        rows = [[ctx + j + 1] for j in range(n_p)]
        for i in range(len(nodes)):
            keep = {i}
            par = nodes[i][1]
            while par >= 0:
                keep.add(par)
                par = nodes[par][1]
            masked = [k not in keep for k in range(i + 1)]
            rows.append(_kv.encode_brle([False] * (ctx + n_p) + masked))
        greedy = Greedy()
        outputs = [(idx, "token", greedy) for idx in range(n_p - 1, n_p + len(nodes))]
        return self._pass(pending + [t for t, _ in nodes], positions,
                          rows if nodes else None, outputs)  # fmt: skip
