"""Orthogonal matrices for rotations: Hadamard matrices where a construction exists, else random.

A Hadamard matrix H (n × n, entries ±1, H Hᵀ = n I) exists for the orders built here:

- **Sylvester**: H_1 = [1], H_2k = [[H_k, H_k], [H_k, −H_k]] — every power of two;
- **Paley I**: q prime, q ≡ 3 (mod 4) → order q + 1 (12 from 11, 20 from 19, 44 from 43, 60 from 59…);
- **Paley II**: q prime, q ≡ 1 (mod 4) → order 2(q + 1) (12 from 5, 28 from 13, 36 from 17, 60 from 29…);
- **Kronecker products** H_a ⊗ H_b of the above: n = 2^k × m for a base m of Paley type.

Both Paley constructions start from the Jacobsthal matrix Q_ij = χ(j − i) of GF(q) (χ the
quadratic character: 0, +1 on squares, −1 otherwise), built here from the squares mod q (prime
q only: no field extension arithmetic). An orthogonal matrix is H·diag(±1)/√n with random signs
(a *randomized Hadamard*); where no construction is known, the Q factor of a Gaussian matrix,
its columns' signs fixed by R's diagonal (Haar-distributed). Both seeded.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from ..errors import InputError

log = logging.getLogger(__name__)


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q (q × q) with Q_ij = χ(j − i mod q), χ the quadratic character mod the prime q."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    i = torch.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


def paley1(q: int) -> torch.Tensor:
    """Order q + 1, q prime ≡ 3 (mod 4): H = I + S with S = [[0, 1ᵀ], [−1, Q]] skew."""
    if not (_is_prime(q) and q % 4 == 3):
        raise InputError(f"Paley I needs a prime q ≡ 3 (mod 4), got {q}")
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + s


def paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1), q prime ≡ 1 (mod 4): the symmetric C = [[0, 1ᵀ], [1, Q]] with each 0 → [[1, −1], [−1, −1]]
    and each ±1 → ±[[1, 1], [1, −1]]."""
    if not (_is_prime(q) and q % 4 == 1):
        raise InputError(f"Paley II needs a prime q ≡ 1 (mod 4), got {q}")
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron((c == 0).to(torch.float64), zero)


def sylvester(n: int) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise InputError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    step = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(step, h)
    return h


def _paley_base(m: int) -> tuple[str, int] | None:
    """A Paley construction of order m: ("paley1", q) or ("paley2", q), or None."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "paley1", m - 1
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "paley2", m // 2 - 1
    return None


BASES = {"paley1": paley1, "paley2": paley2}


@functools.lru_cache(maxsize=32)
def construction(n: int) -> tuple[str, int, int] | None:
    """How to build a Hadamard matrix of order n: (base kind, its parameter, power of two), the
    base "sylvester" when n is a power of two; None when n is not 2^k × a Paley order. The
    largest power of two is split off first (the smallest Paley base)."""
    if n >= 1 and not n & (n - 1):
        return "sylvester", 1, n
    two = n & -n
    while two >= 1:
        m = n // two
        base = _paley_base(m) if m > 2 else None
        if base is not None:
            return base[0], base[1], two
        two //= 2
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """A ±1 matrix H (n × n, float64) with H Hᵀ = n I, or None when no construction here reaches n."""
    how = construction(n)
    if how is None:
        return None
    kind, q, two = how
    if kind == "sylvester":
        return sylvester(n)
    return torch.kron(BASES[kind](q), sylvester(two))


@dataclass(frozen=True)
class Orthogonal:
    """An orthogonal matrix and how it was made (recorded in llmpress.json)."""

    matrix: torch.Tensor  # (n, n) float64, Q Qᵀ = I
    kind: str             # "hadamard" | "random"
    construction: str     # e.g. "paley2(17) ⊗ sylvester(16)", "qr(gaussian)"
    seed: int

    signs: torch.Tensor | None = None        # (n,) ±1 of a randomized Hadamard, else None
    factors: tuple[torch.Tensor, torch.Tensor] | None = None  # (A (a, a), B (b, b)) ±1, H = A ⊗ B

    def record(self) -> dict:
        return {"kind": self.kind, "order": self.matrix.shape[0], "construction": self.construction, "seed": self.seed}

    @classmethod
    def of_record(cls, rec: dict) -> "Orthogonal":
        """The matrix a :meth:`record` describes, rebuilt (seeded: the same bits); refuses a record
        this llmpress would not build the same way."""
        try:
            n, seed, kind = int(rec["order"]), int(rec["seed"]), str(rec["kind"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"rotation record {rec!r}: needs order, seed and kind") from None
        if kind not in ("hadamard", "random") or n < 1:
            raise InputError(f"rotation record {rec!r}: kind hadamard | random and an order ≥ 1")
        o = orthogonal(n, seed, kind)
        if o.construction != rec.get("construction", o.construction):
            raise InputError(f"rotation record {rec!r}: this llmpress builds order {n} as {o.construction}")
        return o

    def right(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """x Q (``inverse``: x Qᵀ) for x (..., n), in x's dtype and device: a randomized Hadamard
        as (x ⊙ s) reshaped (..., a, b), Aᵀ X B (two small products, O(n (a + b)) a row; the
        inverse A X Bᵀ, then ⊙ s), else one product with Q (Qᵀ)."""
        n = self.matrix.shape[0]
        if self.factors is None or self.signs is None:
            m = self.matrix.to(x.device, x.dtype)
            return x @ (m.T if inverse else m)
        a, b = (f.to(x.device, x.dtype) for f in self.factors)
        s = self.signs.to(x.device, x.dtype)
        if inverse:  # x Qᵀ = x (A ⊗ B)ᵀ diag(s) / √n
            y = torch.matmul(a, x.reshape(*x.shape[:-1], a.shape[0], b.shape[0])) @ b.T  # (..., a, b)
            return y.reshape(x.shape) * s * (1.0 / n ** 0.5)
        y = (x * s).reshape(*x.shape[:-1], a.shape[0], b.shape[0])  # (..., a, b)
        y = torch.matmul(a.T, y) @ b  # (..., a, b)
        return y.reshape(x.shape) * (1.0 / n ** 0.5)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Haar-random orthogonal (n × n, float64): Q of a Gaussian's QR, columns × sign(diag R)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))[None, :]


def orthogonal(n: int, seed: int = 0, kind: str = "auto") -> Orthogonal:
    """A seeded orthogonal n × n: the randomized Hadamard diag(±1)·H/√n where n has a construction
    (``kind`` "auto" or "hadamard"; "hadamard" refuses an order without one), else (or with
    ``kind="random"``) a random orthogonal matrix."""
    if kind not in ("auto", "hadamard", "random"):
        raise InputError(f"rotation kind: auto | hadamard | random, got {kind!r}")
    how = construction(n) if kind != "random" else None
    if how is None:
        if kind == "hadamard":
            raise InputError(f"no Hadamard construction here for order {n} (2^k, or 2^k × a Paley order)")
        log.info("rotation of order %d: random orthogonal (seed %d)%s", n, seed,
                 "" if kind == "random" else ": no Hadamard construction for this order")
        return Orthogonal(random_orthogonal(n, seed), "random", "qr(gaussian)", seed)
    base, q, two = how
    name = f"sylvester({n})" if base == "sylvester" else f"{base}({q}) ⊗ sylvester({two})"
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    if base == "sylvester":  # sylvester(n) = sylvester(a) ⊗ sylvester(n / a), a ≈ √n
        half = 1 << (n.bit_length() - 1) // 2
        a, b = sylvester(half), sylvester(n // half)
    else:
        a, b = BASES[base](q), sylvester(two)
    h = torch.kron(a, b)
    log.info("rotation of order %d: randomized Hadamard %s (seed %d)", n, name, seed)
    return Orthogonal(signs[:, None] * h / n ** 0.5, "hadamard", name, seed, signs, (a, b))
