//! spool-proto: the `.proto` files of spool's gRPC admin API and the code generated from them.
//!
//! Empty until the admin API lands; it exists now so the workspace has its final shape and every
//! member builds from the first commit.
