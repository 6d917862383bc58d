//! The time embedding MLP (diffusers' `TimestepEmbedding`), used for the timestep and for SDXL's
//! `text_time` add-embedding.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::Linear;

/// `linear_1` -> SiLU -> `linear_2`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(vb.pp("linear_1"), in_dim, out_dim, true)?,
            linear_2: Linear::new(vb.pp("linear_2"), out_dim, out_dim, true)?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}
