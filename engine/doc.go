// Package engine serves the page faults of memory that another process registered on a
// userfaultfd, from a [source.Source], correctly under every event the kernel sends.
//
// An [Engine] owns one userfaultfd (received from a VMM, or from a fork event) and the regions
// registered on it. One goroutine, Run's own, reads messages in batches; each batch's events are
// applied before its faults, under a lock that every resolving ioctl holds shared, so a page
// removed by MADV_DONTNEED is never refilled with stale source data. The reader resolves faults
// itself and hands the rest of a batch to helper installers when Options.Workers asks for them.
// Page state lives in bitmaps (installed, removed, dirty, fetching). Faults are served with
// fault-around — one UFFDIO_COPY of several pages, the window earned per sequential stream (a
// region tracks several, so vCPUs walking their own memory are told apart) and capped in bytes
// — zero pages where the source knows it is zero, and whole huge pages on hugetlb. Sources that
// are not resident are read off the fault path by fetchers, so a slow fetch never blocks faults
// that can be served now. An idle engine over a resident source costs one parked goroutine.
//
// The engine never serves a wrong byte: a source error, an exhausted hugetlb pool or an
// unexpected errno stops it, and Run returns the error so the owner can kill the faulting
// process — the honest outcome for a guest that cannot be served.
package engine
