//! AllegroGraph 8.x multi-master replication clusters.

pub mod objects;
