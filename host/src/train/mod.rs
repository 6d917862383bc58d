//! Training: datasets and buckets, latent and text-embedding caches, the optimizer, learning-rate schedules.

pub mod buckets;
pub mod cache;
pub mod dataset;
pub mod optim;
pub mod schedule;
pub mod config;
pub mod kohya;
pub mod trainer;
pub mod checkpoint;
pub mod command;
pub mod samples;
pub mod losslog;
pub mod export;
