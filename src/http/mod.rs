//! HTTP/1.x on the wire: heads, chunked decoding, body pumps, buffer I/O.

pub mod body;
pub mod chunked;
pub mod head;
pub mod io;
pub mod zerocopy;
