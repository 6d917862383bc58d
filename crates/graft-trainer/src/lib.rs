//! Training: datasets and buckets, latent and text-embedding caches, the optimizer,
//! learning-rate schedules, the training step, checkpoints, samples and exports.

pub mod buckets;
pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod dataset;
pub mod error;
pub mod export;
pub mod kohya;
pub mod losslog;
pub mod names;
pub mod optim;
pub mod options;
pub mod png_out;
pub mod samples;
pub mod schedule;
pub mod session;
pub mod trainer;
pub mod vae_train;
pub mod validation;
