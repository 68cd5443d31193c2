// Package engine serves the page faults of memory that another process registered on a
// userfaultfd, from a [source.Source], correctly under every event the kernel sends.
//
// An [Engine] owns one userfaultfd (received from a VMM, or from a fork event) and the regions
// registered on it. Workers read messages in batches; each batch's events are applied before its
// faults, under a lock that also covers every resolving ioctl, so a page removed by
// MADV_DONTNEED is never refilled with stale source data. Page state lives in bitmaps (installed,
// removed, dirty, fetching). Faults are served with fault-around — one UFFDIO_COPY of several
// pages, growing on sequential access and shrinking on random — zero pages where the source
// knows it is zero, and whole huge pages on hugetlb. Sources that are not resident are read
// off the fault path, so a slow fetch never blocks faults that can be served now.
//
// The engine never serves a wrong byte: a source error, an exhausted hugetlb pool or an
// unexpected errno stops it, and Run returns the error so the owner can kill the faulting
// process — the honest outcome for a guest that cannot be served.
package engine
