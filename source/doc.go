// Package source supplies the bytes of a memory image to the fault-serving engine.
//
// A [Source] is any io.ReaderAt with a size: it may be slow, remote and fallible (compressed
// chunks, object storage, a peer daemon), and the engine calls ReadAt off the fault path so a
// slow fetch never holds up faults that can be served now. Sources whose bytes already sit in
// this process's memory also implement [Resident]: the engine then hands the kernel their address
// and UFFDIO_COPY copies straight from them — for a [File], straight from the page cache — with
// no bounce buffer. Sources that know where their zeros are implement [Zeros], and the engine
// installs those runs with UFFDIO_ZEROPAGE.
package source
