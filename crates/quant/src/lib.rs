//! ggml block formats on the CPU.
