"""The CPU steps of the screened OMP search (`omp.py`) as a small C function, built on first use.

Between two re-rankings every target walks through its own steps: score its M candidates against the residual
(bf16 products, as the torch path), take the best, Gram-Schmidt (twice) against the atoms already picked, update
the Cholesky row, z and the residual. In torch each step is ~45 small batched operations: their dispatch costs
more than their arithmetic, and the candidates of a group of targets ([16, M, d] bf16, 5 MB) fall out of the caches
between steps when other processes share them. Here one target's candidates and basis (~0.5 MB) stay in its core's
L2 cache for the whole segment, and a step has no per-operation overhead. Same arithmetic as the torch path
(float32, bf16 candidate scores, same tie rule: the lowest atom index); sums are taken in another order, so scores
can differ in the last bit and a near-tie can go the other way (measured in docs/results/transplant.md).

Built with the system C compiler (`CC`, else `cc`) into ~/.cache/bitsmith/native/ (or $BITSMITH_CACHE/native/),
keyed by the source, the flags and the CPU. No compiler, a failed build, or BITSMITH_OMP_NATIVE=0: the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("bitsmith")

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* float32 -> bfloat16, round to nearest even (as torch) */
static inline float round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return f; /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    memcpy(&f, &u, 4);
    return f;
}

static float dot(const float *a, const float *b, int64_t d) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= d; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    for (; i < d; i++) s += a[i] * b[i];
    return s;
}

static float dot_bf16(const float *a, const uint16_t *b, int64_t d) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= d; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * bf16_to_f32(b[i + l]);
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    for (; i < d; i++) s += a[i] * bf16_to_f32(b[i]);
    return s;
}

/* out = sum_j w[j] * Q[j, :] over j < t */
static void combine(const float *w, const float *Q, int64_t t, int64_t d, float *out) {
    memset(out, 0, sizeof(float) * d);
    for (int64_t j = 0; j < t; j++) {
        const float *q = Q + j * d;
        float c = w[j];
        for (int64_t e = 0; e < d; e++) out[e] += c * q[e];
    }
}

static inline float med3(float x, float y, float z) {
    if (x > y) { float t = x; x = y; y = t; }
    if (y > z) { y = z; if (x > y) y = x; }
    return y;
}

/* The value at position kth (0-based) of a[0..n-1] sorted in descending order; reorders a. */
static float select_desc(float *a, int64_t n, int64_t kth) {
    int64_t lo = 0, hi = n - 1;
    while (hi > lo) {
        float pivot = med3(a[lo], a[lo + (hi - lo) / 2], a[hi]);
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) { float t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (kth <= j) hi = j;
        else if (kth >= i) lo = i;
        else return a[kth];
    }
    return a[kth];
}

/* Rows lo..hi-1 of S [b, n] (bf16 correlations of the residuals with all atoms): the M atoms with the largest
   |S| / ||a|| (atoms idx[i, :r0], already picked, count -1), in ascending atom order, into out [b, M]. At the
   boundary, equal scores go to the lowest atom indices. The M-th largest score is at least the M-th largest of the
   maxima of blocks of BLOCK scores (M blocks hold a score at least that large), so only the scores above that bound
   go through the selection. Returns 0, or -1 when out of memory. */
#define BLOCK 64
int top_candidates(int64_t lo, int64_t hi, int64_t n, int64_t M, const uint16_t *S, const float *inv_norm,
                   const int64_t *idx, int64_t k, int64_t r0, int64_t *out) {
    int64_t nb = (n + BLOCK - 1) / BLOCK;
    float *sc = malloc(sizeof(float) * n), *vals = malloc(sizeof(float) * n), *bm = malloc(sizeof(float) * nb);
    int64_t *pos = malloc(sizeof(int64_t) * n);
    if (!sc || !vals || !bm || !pos) { free(sc); free(vals); free(bm); free(pos); return -1; }
    for (int64_t i = lo; i < hi; i++) {
        const uint16_t *row = S + i * n;
        for (int64_t j = 0; j < n; j++) sc[j] = fabsf(bf16_to_f32(row[j])) * inv_norm[j];
        for (int64_t t = 0; t < r0; t++) sc[idx[i * k + t]] = -1.0f;
        float bound = -INFINITY;
        if (nb > M) {
            for (int64_t c = 0; c < nb; c++) {
                float m = -INFINITY;
                int64_t e = (c + 1) * BLOCK < n ? (c + 1) * BLOCK : n;
                for (int64_t j = c * BLOCK; j < e; j++) m = sc[j] > m ? sc[j] : m;
                bm[c] = m;
            }
            bound = select_desc(bm, nb, M - 1);
        }
        int64_t cnt = 0;
        for (int64_t j = 0; j < n; j++)
            if (sc[j] >= bound) { pos[cnt] = j; vals[cnt] = sc[j]; cnt++; }
        float thr = select_desc(vals, cnt, M - 1);
        int64_t above = 0;
        for (int64_t c = 0; c < cnt; c++) above += sc[pos[c]] > thr;
        int64_t ties = M - above, m = 0;
        int64_t *o = out + i * M;
        for (int64_t c = 0; c < cnt && m < M; c++) {
            float v = sc[pos[c]];
            if (v > thr) o[m++] = pos[c];
            else if (v == thr && ties > 0) { o[m++] = pos[c]; ties--; }
        }
    }
    free(sc); free(vals); free(bm); free(pos);
    return 0;
}

/* Steps r0..r1-1 for targets lo..hi-1. Returns 0, or -1 when out of memory. */
int omp_segment(int64_t lo, int64_t hi, int64_t d, int64_t k, int64_t M, int64_t r0, int64_t r1,
                const float *A, const uint16_t *Ab, const float *norm, const float *sq, const float *inv_norm,
                const int64_t *cand, float *L, float *z, uint8_t *used, uint8_t *active, const float *stop,
                int64_t *idx, float *Q, float *R, float dependent) {
    float *w = malloc(sizeof(float) * (k + 1));
    float *w2 = malloc(sizeof(float) * (k + 1));
    float *v = malloc(sizeof(float) * d);
    float *tmp = malloc(sizeof(float) * d);
    float *rb = malloc(sizeof(float) * d);
    uint8_t *taken = malloc(M);
    if (!w || !w2 || !v || !tmp || !rb || !taken) {
        free(w); free(w2); free(v); free(tmp); free(rb); free(taken);
        return -1;
    }
    for (int64_t i = lo; i < hi; i++) {
        const int64_t *c = cand + i * M;
        float *Qi = Q + i * k * d, *Ri = R + i * d, *Li = L + i * k * k;
        memset(taken, 0, M);
        for (int64_t t = r0; t < r1; t++) {
            /* the candidate most correlated with the residual: |bf16(r) . a_c| (rounded to bf16) / ||a_c|| */
            for (int64_t e = 0; e < d; e++) rb[e] = round_bf16(Ri[e]);
            int64_t best = 0;
            float bestv = -INFINITY;
            for (int64_t j = 0; j < M; j++) {
                float sc = taken[j] ? -1.0f : fabsf(round_bf16(dot_bf16(rb, Ab + c[j] * d, d))) * inv_norm[c[j]];
                if (sc > bestv) { bestv = sc; best = j; }
            }
            taken[best] = 1;
            int64_t s = c[best];
            idx[i * k + t] = s;
            const float *a = A + s * d;
            float corr = dot(a, Ri, d);
            float pivot = sq[s];
            if (t > 0) {
                for (int64_t j = 0; j < t; j++) w[j] = dot(a, Qi + j * d, d);
                combine(w, Qi, t, d, tmp);
                for (int64_t e = 0; e < d; e++) v[e] = a[e] - tmp[e];
                for (int64_t j = 0; j < t; j++) w2[j] = dot(v, Qi + j * d, d);
                combine(w2, Qi, t, d, tmp);
                for (int64_t e = 0; e < d; e++) v[e] -= tmp[e];
                float ww = 0.0f;
                for (int64_t j = 0; j < t; j++) { w[j] += w2[j]; ww += w[j] * w[j]; }
                pivot = sq[s] - ww;
            } else {
                memcpy(v, a, sizeof(float) * d);
            }
            int act = active[i] && fabsf(corr) > stop[i] * norm[s];
            int ok = act && pivot > dependent * sq[s];
            float diag = ok ? sqrtf(fmaxf(pivot, 1e-30f)) : 1.0f;
            float inv = ok ? 1.0f / diag : 0.0f;
            for (int64_t j = 0; j < t; j++) Li[t * k + j] = ok ? w[j] : 0.0f;
            Li[t * k + t] = diag;
            float zt = corr * inv;
            z[i * k + t] = zt;
            used[i * k + t] = (uint8_t)ok;
            active[i] = (uint8_t)act;
            float *q = Qi + t * d;
            for (int64_t e = 0; e < d; e++) {
                q[e] = v[e] * inv;
                Ri[e] -= q[e] * zt;
            }
        }
    }
    free(w); free(w2); free(v); free(tmp); free(rb); free(taken);
    return 0;
}
"""

_FLAGS = ["-O3", "-march=native", "-std=c99", "-shared", "-fPIC"]
_lock = threading.Lock()
_state: dict = {}


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


def _build() -> ctypes.CDLL | None:
    if os.environ.get("BITSMITH_OMP_NATIVE", "1") == "0":
        return None
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    key = hashlib.sha256("\0".join([_SOURCE, " ".join(cc + _FLAGS), _cpu_key()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("BITSMITH_CACHE") or Path.home() / ".cache" / "bitsmith") / "native"
    lib = cache / f"omp_{key}.so"
    if not lib.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                src = Path(tmp) / "omp.c"
                src.write_text(_SOURCE)
                out = Path(tmp) / "omp.so"
                subprocess.run(cc + _FLAGS + [str(src), "-o", str(out), "-lm"], check=True, capture_output=True,
                               timeout=120)
                os.replace(out, lib)
        except (OSError, subprocess.SubprocessError) as e:
            err = getattr(e, "stderr", b"") or b""
            log.info(f"omp: no native CPU steps ({e} {err.decode(errors='replace')[:200]}); using the torch path")
            return None
    try:
        so = ctypes.CDLL(str(lib))
    except OSError as e:
        log.info(f"omp: cannot load {lib} ({e}); using the torch path")
        return None
    fn = so.omp_segment
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int64] * 7 + [ctypes.c_void_p] * 14 + [ctypes.c_float]
    fn = so.top_candidates
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
    return so


def available() -> bool:
    """Whether the native CPU steps can be used (builds them on the first call)."""
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _build()
    return _state["lib"] is not None


def segment(lo: int, hi: int, r0: int, r1: int, A, Ab, norm, sq, inv_norm, cand, f, dependent: float) -> None:
    """Steps r0..r1-1 of targets lo..hi-1 of factor state f (omp._Factor), in place. Releases the GIL (ctypes),
    so threads can run disjoint target ranges at once."""
    b, k, d = f.Q.shape
    M = cand.shape[1]
    ptr = lambda x: x.data_ptr()  # noqa: E731
    rc = _state["lib"].omp_segment(
        lo, hi, d, k, M, r0, r1, ptr(A), ptr(Ab), ptr(norm), ptr(sq), ptr(inv_norm), ptr(cand), ptr(f.L), ptr(f.z),
        ptr(f.used), ptr(f.active), ptr(f.stop), ptr(f.idx), ptr(f.Q), ptr(f.R), dependent)
    if rc != 0:
        raise MemoryError("omp: native steps could not allocate their work space")


def top_candidates(lo: int, hi: int, S: torch.Tensor, inv_norm: torch.Tensor, idx: torch.Tensor, r0: int,
                   out: torch.Tensor) -> None:
    """Rows lo..hi-1: out[i] = the M atoms with the largest |S[i]| * inv_norm (the atoms idx[i, :r0] left out), in
    ascending order; S [b, n] bf16, out [b, M] int64. The fused float conversion, scaling and top-M selection of the
    re-ranking (no [b, n] float32 copy); releases the GIL."""
    b, n = S.shape
    rc = _state["lib"].top_candidates(lo, hi, n, out.shape[1], S.data_ptr(), inv_norm.data_ptr(), idx.data_ptr(),
                                      idx.shape[1], r0, out.data_ptr())
    if rc != 0:
        raise MemoryError("omp: native top-M could not allocate its work space")
