//! Matrix products on strided views of f32 slices, straight into gemm (the crate candle's CPU
//! matmul uses): no copies in or out, the destination may be a block of a larger matrix, and
//! the caller picks the threading. [`matmul_any`] takes an operand in half precision (a frozen
//! weight) too.

pub use gemm::Parallelism;
use half::bf16;

/// A strided matrix inside a slice: element (i, j) at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct View<'a, T = f32> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> View<'a, T> {
    /// A contiguous [rows, cols] matrix.
    pub fn dense(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, rs: cols, cs: 1 }
    }

    pub fn rows(self, start: usize, len: usize) -> Self {
        Self { data: &self.data[start * self.rs..], rows: len, ..self }
    }

    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }

    /// True when every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

impl<'a, T: Copy> View<'a, T> {
    /// The matrix as a contiguous f32 [rows, cols] copy.
    fn to_f32_dense(self, f: impl Fn(T) -> f32) -> Vec<f32> {
        assert!(self.in_bounds(), "view out of bounds");
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for i in 0..self.rows {
            out.extend((0..self.cols).map(|j| f(self.data[i * self.rs + j * self.cs])));
        }
        out
    }

    fn gemm_ref(self) -> graft_gemm::MatRef<'a, T> {
        graft_gemm::MatRef { data: self.data, rows: self.rows, cols: self.cols, row_stride: self.rs, col_stride: self.cs }
    }
}

/// A matrix operand in f32 or, for a weight kept in bf16, bf16.
#[derive(Clone, Copy)]
pub enum Operand<'a> {
    F32(View<'a, f32>),
    Bf16(View<'a, bf16>),
}

impl Operand<'_> {
    pub fn t(self) -> Self {
        match self {
            Operand::F32(v) => Operand::F32(v.t()),
            Operand::Bf16(v) => Operand::Bf16(v.t()),
        }
    }
}

/// [`matmul`] where either side may be bf16: the product then runs in bf16 with f32
/// accumulation when the CPU has a bf16 unit, else on the bf16 side widened to f32.
pub fn matmul_any(dst: &mut [f32], dst_rs: usize, lhs: Operand, rhs: Operand, accumulate: bool, par: Parallelism) {
    use Operand as O;
    let widen = |v: View<bf16>| (v.to_f32_dense(bf16::to_f32), v.rows, v.cols);
    let beta = if accumulate { 1.0 } else { 0.0 };
    match (lhs, rhs, crate::precision::bf16_kernel()) {
        (O::F32(l), O::F32(r), _) => matmul(dst, dst_rs, l, r, 1.0, accumulate, par),
        (O::Bf16(l), O::F32(r), Some(k)) => graft_gemm::gemm(k, l.gemm_ref(), r.gemm_ref(), dst, dst_rs, beta),
        (O::F32(l), O::Bf16(r), Some(k)) => graft_gemm::gemm(k, l.gemm_ref(), r.gemm_ref(), dst, dst_rs, beta),
        (O::Bf16(l), O::Bf16(r), Some(k)) => graft_gemm::gemm(k, l.gemm_ref(), r.gemm_ref(), dst, dst_rs, beta),
        (l, r, None) => {
            let (lw, rw);
            let l = match l {
                O::F32(v) => v,
                O::Bf16(v) => {
                    lw = widen(v);
                    View::dense(&lw.0, lw.1, lw.2)
                }
            };
            let r = match r {
                O::F32(v) => v,
                O::Bf16(v) => {
                    rw = widen(v);
                    View::dense(&rw.0, rw.1, rw.2)
                }
            };
            matmul(dst, dst_rs, l, r, 1.0, accumulate, par)
        }
    }
}

/// `dst [lhs.rows, rhs.cols] (rows `dst_rs` apart) = scale * lhs @ rhs`, plus `dst` when
/// `accumulate`.
pub fn matmul(dst: &mut [f32], dst_rs: usize, lhs: View, rhs: View, scale: f32, accumulate: bool, par: Parallelism) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let dst_fits = m == 0 || n == 0 || (n <= dst_rs && (m - 1) * dst_rs + n <= dst.len());
    assert!(rhs.rows == k && dst_fits && lhs.in_bounds() && rhs.in_bounds(), "matmul out of bounds");
    // SAFETY: the assert above keeps every element gemm reads or writes inside its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        )
    }
}
