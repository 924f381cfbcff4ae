//! What both sides of Updraft share: the node with its providers, and the cell agent.
//!
//! Only utilities that have no better owner live here, each once: an error's cause chain as
//! one line ([`error_chain`]), the poison-ignoring lock ([`sync::lock`]), Kubernetes resource
//! quantities ([`quantity`]), and the Service routes and NetworkPolicy tables the node
//! derives and the cell agents install ([`services`], [`network_policy`]), wire types of
//! both sides. A utility that belongs to a concept (a
//! backend, the agent's API) lives in that concept's crate instead.

pub mod error_chain;
pub mod network_policy;
pub mod quantity;
pub mod services;
pub mod sync;

pub use error_chain::error_chain;
