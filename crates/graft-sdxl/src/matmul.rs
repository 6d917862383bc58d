//! Matrix products on strided views of f32 slices, straight into gemm (the crate candle's CPU
//! matmul uses): no copies in or out, the destination may be a block of a larger matrix, and
//! the caller picks the threading.

pub use gemm::Parallelism;

/// A strided matrix inside a slice: element (i, j) at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A contiguous [rows, cols] matrix.
    pub fn dense(data: &'a [f32], rows: usize, cols: usize) -> Self {
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

/// `dst [lhs.rows, rhs.cols] (rows `dst_rs` apart) = scale * lhs @ rhs`, plus `dst` when
/// `accumulate`.
pub fn matmul(dst: &mut [f32], dst_rs: usize, lhs: View, rhs: View, scale: f32, accumulate: bool, par: Parallelism) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let dst_fits = m == 0 || n == 0 || (n <= dst_rs && (m - 1) * dst_rs + n <= dst.len());
    assert!(rhs.rows == k && dst_fits && lhs.in_bounds() && rhs.in_bounds(), "matmul out of bounds");
    // SAFETY: the assert above keeps every element gemm reads or writes inside its slice.
    unsafe {
        gemm::gemm(
            m, n, k,
            dst.as_mut_ptr(), 1, dst_rs as isize, accumulate,
            lhs.data.as_ptr(), lhs.cs as isize, lhs.rs as isize,
            rhs.data.as_ptr(), rhs.cs as isize, rhs.rs as isize,
            1.0, scale, false, false, false, par,
        )
    }
}

