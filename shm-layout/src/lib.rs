//! The shared-memory ABI of switchyard.


pub mod shm;
