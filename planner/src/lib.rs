#![warn(missing_docs)]
//! The planner: what a training step holds (inventory), where each saved activation waits
//! (MEMO's swap/recompute LP), where device buffers sit (the layout MIP), and whether it all fits.
//! It knows nothing of models beyond an inventory of named tensors with shapes; the trainer
//! builds that inventory from the code that allocates the tensors.
pub mod inventory;
pub mod layout;
pub mod memo;
pub mod placement;
pub mod plan;
pub mod report;
