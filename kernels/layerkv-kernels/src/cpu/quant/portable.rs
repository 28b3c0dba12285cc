//! The GGUF block layouts in plain Rust: each weight block is unpacked to integer values with
//! its scales ([`Unpacked32`], [`UnpackedK`]), which [`dequantize_blocks`] turns into f32 and
//! the portable dot products multiply by the quantized activations in exact integer sums (one
//! f32 scaling per block or group, as llama.cpp's reference `vec_dot`s do). Unpacking lives on
//! the stack: no allocation.
//!
//! Layouts (bytes, little-endian f16 scales), element `j < 16` of a 32-block in the low nibble
//! of `qs[j]`, element `j + 16` in its high nibble, and the fifth bit of element `i` in bit `i`
//! of `qh`:
//! - Q4_0 (18): `d`, `qs[16]`; `w = d (q - 8)`.
//! - Q4_1 (20): `d`, `m`, `qs[16]`; `w = d q + m`.
//! - Q5_0 (22): `d`, `qh[4]`, `qs[16]`; `w = d (q - 16)`.
//! - Q5_1 (24): `d`, `m`, `qh[4]`, `qs[16]`; `w = d q + m`.
//! - Q8_0 (34): `d`, `qs[32]` (i8); `w = d q`.
//! - Q4_K (144): `d`, `dmin`, `scales[12]` (eight 6-bit scales and mins), `qs[128]`: 64-value
//!   chunks, the low nibbles of `qs[32 c..]` then the high ones; `w = d sc q - dmin m` per 32.
//! - Q5_K (176): as Q4_K plus `qh[32]` before `qs`: bit `2c` of `qh[l]` tops element `64 c + l`,
//!   bit `2c + 1` element `64 c + 32 + l`.
//! - Q6_K (210): `ql[128]`, `qh[64]`, `scales[16]` (i8, one per 16), `d`; `w = d sc (q - 32)`.

use super::{BlockQ8K, BlockQ8_1, WeightType, QK, QK_K};

/// A little-endian f16 at `b[i..i + 2]`, as f32.
#[inline]
pub(super) fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

#[inline]
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// One 32-element block as `w = d * q + m`.
pub(super) struct Unpacked32 {
    d: f32,
    m: f32,
    q: [i32; QK],
}

/// Unpacks one block of a 32-element type (`b` is exactly one block).
pub(super) fn unpack32(ty: WeightType, b: &[u8]) -> Unpacked32 {
    let mut q = [0i32; QK];
    // (d, m, nibbles' offset, fifth bits' offset, the value q = 0 stands for in units of d)
    let (d, m, qs, qh, zero) = match ty {
        WeightType::Q4_0 => (f16_at(b, 0), 0.0, 2, None, 8),
        WeightType::Q4_1 => (f16_at(b, 0), f16_at(b, 2), 4, None, 0),
        WeightType::Q5_0 => (f16_at(b, 0), 0.0, 6, Some(2), 16),
        WeightType::Q5_1 => (f16_at(b, 0), f16_at(b, 2), 8, Some(4), 0),
        WeightType::Q8_0 => {
            for (q, &v) in q.iter_mut().zip(&b[2..2 + QK]) {
                *q = v as i8 as i32;
            }
            return Unpacked32 {
                d: f16_at(b, 0),
                m: 0.0,
                q,
            };
        }
        WeightType::Q4K | WeightType::Q5K | WeightType::Q6K => {
            unreachable!("{ty:?} is not a 32-element type")
        }
    };
    let high = qh.map_or(0, |o| u32_at(b, o));
    for j in 0..QK / 2 {
        let lo = (b[qs + j] & 0x0F) as i32 | (((high >> j) & 1) << 4) as i32;
        let hi = (b[qs + j] >> 4) as i32 | (((high >> (j + 16)) & 1) << 4) as i32;
        q[j] = lo - zero;
        q[j + QK / 2] = hi - zero;
    }
    Unpacked32 { d, m, q }
}

/// One 256-element super-block as `w = d * sc[g] * q - dmin * mn[g]` for the group `g` of
/// `group` values an element falls in.
pub(super) struct UnpackedK {
    d: f32,
    dmin: f32,
    /// 32 (Q4_K, Q5_K) or 16 (Q6_K).
    group: usize,
    sc: [i32; 16],
    mn: [i32; 16],
    q: [i32; QK_K],
}

/// Scale and minimum of 32-group `j` from a Q4_K/Q5_K block's 12 packed bytes (llama.cpp's
/// `get_scale_min_k4`): groups 0..4 in the low 6 bits of bytes `j` and `j + 4`, groups 4..8
/// split between the nibbles of bytes `j + 4` and the top bits of bytes `j - 4` and `j`.
fn scale_min_k4(j: usize, s: &[u8]) -> (i32, i32) {
    if j < 4 {
        ((s[j] & 63) as i32, (s[j + 4] & 63) as i32)
    } else {
        (
            ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4)) as i32,
            ((s[j + 4] >> 4) | ((s[j] >> 6) << 4)) as i32,
        )
    }
}

/// Unpacks one K-quant super-block (`b` is exactly one block).
pub(super) fn unpack_k(ty: WeightType, b: &[u8]) -> UnpackedK {
    let mut u = UnpackedK {
        d: 0.0,
        dmin: 0.0,
        group: 32,
        sc: [0; 16],
        mn: [0; 16],
        q: [0; QK_K],
    };
    match ty {
        WeightType::Q4K | WeightType::Q5K => {
            u.d = f16_at(b, 0);
            u.dmin = f16_at(b, 2);
            let scales = &b[4..16];
            for j in 0..8 {
                (u.sc[j], u.mn[j]) = scale_min_k4(j, scales);
            }
            let (qh, qs) = if ty == WeightType::Q5K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for c in 0..4 {
                for l in 0..32 {
                    let v = qs[32 * c + l];
                    let (top_lo, top_hi) = qh.map_or((0, 0), |h| {
                        (
                            ((h[l] >> (2 * c)) & 1) << 4,
                            ((h[l] >> (2 * c + 1)) & 1) << 4,
                        )
                    });
                    u.q[64 * c + l] = ((v & 0x0F) | top_lo) as i32;
                    u.q[64 * c + 32 + l] = ((v >> 4) | top_hi) as i32;
                }
            }
        }
        WeightType::Q6K => {
            u.group = 16;
            let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
            u.d = f16_at(b, 208);
            for (s, &v) in u.sc.iter_mut().zip(scales) {
                *s = v as i8 as i32;
            }
            for h in 0..2 {
                let (ql, qh, q) = (&ql[64 * h..], &qh[32 * h..], &mut u.q[128 * h..]);
                for l in 0..32 {
                    q[l] = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                    q[l + 32] = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    q[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    q[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                }
            }
        }
        _ => unreachable!("{ty:?} is not a K-quant"),
    }
    u
}

/// Dequantizes whole blocks of `ty` into `out` (`ty.block_elems()` values a block).
pub(super) fn dequantize_blocks(ty: WeightType, w: &[u8], out: &mut [f32]) {
    let (bb, be) = (ty.block_bytes(), ty.block_elems());
    for (b, out) in w.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
        if be == QK {
            let u = unpack32(ty, b);
            for (o, &q) in out.iter_mut().zip(&u.q) {
                *o = u.d * q as f32 + u.m;
            }
        } else {
            let u = unpack_k(ty, b);
            for (g, out) in out.chunks_exact_mut(u.group).enumerate() {
                let scale = u.d * u.sc[g] as f32;
                let min = u.dmin * u.mn[g] as f32;
                for (o, &q) in out.iter_mut().zip(&u.q[g * u.group..]) {
                    *o = scale * q as f32 - min;
                }
            }
        }
    }
}

/// The dot of one weight row of a 32-element type (`x.len()` blocks) and one Q8_1 row:
/// `sum d_w d_x sum(q q_x) + m_w s_x`.
pub(super) fn dot_q8_1(ty: WeightType, w: &[u8], x: &[BlockQ8_1]) -> f32 {
    let mut sum = 0f32;
    for (b, y) in w.chunks_exact(ty.block_bytes()).zip(x) {
        let u = unpack32(ty, b);
        let isum: i32 = u.q.iter().zip(&y.qs).map(|(&q, &v)| q * v as i32).sum();
        sum += u.d * y.d * isum as f32 + u.m * y.s;
    }
    sum
}

/// The dot of one K-quant weight row (`x.len()` super-blocks) and one Q8_K row:
/// `sum d_x (d sum_g sc_g sum(q q_x) - dmin sum_g mn_g sum_g(q_x))`, the last sums from the
/// activation's `bsums`.
pub(super) fn dot_q8k(ty: WeightType, w: &[u8], x: &[BlockQ8K]) -> f32 {
    let mut sum = 0f32;
    for (b, y) in w.chunks_exact(ty.block_bytes()).zip(x) {
        let u = unpack_k(ty, b);
        let (mut isum, mut msum) = (0i32, 0i32);
        let per = u.group / 16;
        for g in 0..QK_K / u.group {
            let r = g * u.group..(g + 1) * u.group;
            let dot: i32 = u.q[r.clone()]
                .iter()
                .zip(&y.qs[r])
                .map(|(&q, &v)| q * v as i32)
                .sum();
            isum += u.sc[g] * dot;
            let xsum: i32 = y.bsums[g * per..(g + 1) * per]
                .iter()
                .map(|&s| s as i32)
                .sum();
            msum += u.mn[g] * xsum;
        }
        sum += y.d * (u.d * isum as f32 - u.dmin * msum as f32);
    }
    sum
}
