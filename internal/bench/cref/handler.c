// The C reference handler for `faultline bench`: the least a page-fault handler can do.
// It serves the userfaultfd inherited as fd 3 for the region [base, base+size), copying K pages
// per fault from a read-only shared mapping of the snapshot file (the same source the Go engine
// uses), until the fd is closed by the peer or it is killed. One thread, poll + a read of up to
// 64 messages. It never spins: it blocks in poll whenever no message is queued. When ready it
// prints "ready N", N the CPU time (ns, user + system) its set-up used, so that the caller can
// subtract it from the total wait4 reports.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv) {
	if (argc != 5) {
		fprintf(stderr, "usage: cref BASE SIZE PAGES_PER_FAULT SNAPSHOT (uffd on fd 3)\n");
		return 2;
	}
	unsigned long base = strtoul(argv[1], 0, 0), size = strtoul(argv[2], 0, 0);
	unsigned long k = strtoul(argv[3], 0, 0), pg = sysconf(_SC_PAGESIZE);
	int sf = open(argv[4], O_RDONLY);
	if (sf < 0) { perror("open snapshot"); return 1; }
	char *src = mmap(0, size, PROT_READ, MAP_SHARED, sf, 0);
	if (src == MAP_FAILED) { perror("mmap snapshot"); return 1; }
	int uffd = 3;
	struct uffd_msg msgs[64];
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	long long setup = (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000LL +
			  (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000LL;
	printf("ready %lld\n", setup);
	fflush(stdout);
	for (;;) {
		struct pollfd p = {.fd = uffd, .events = POLLIN};
		if (poll(&p, 1, -1) < 0) { if (errno == EINTR) continue; perror("poll"); return 1; }
		if (p.revents & (POLLERR | POLLHUP)) return 0;
		ssize_t n = read(uffd, msgs, sizeof msgs);
		if (n < 0) { if (errno == EAGAIN || errno == EINTR) continue; perror("read"); return 1; }
		for (int i = 0; i < n / (ssize_t)sizeof msgs[0]; i++) {
			if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
			unsigned long addr = msgs[i].arg.pagefault.address & ~(pg - 1), off = addr - base;
			unsigned long len = k * pg;
			if (off + len > size) len = size - off;
			struct uffdio_copy c = {.dst = addr, .src = (unsigned long)src + off, .len = len};
			if (ioctl(uffd, UFFDIO_COPY, &c) && c.copy <= 0) {
				// A later page of the window is mapped (EEXIST on the first would mean done):
				// fall back to the faulting page alone, then wake it whatever happened.
				struct uffdio_copy c1 = {.dst = addr, .src = (unsigned long)src + off, .len = pg};
				if (ioctl(uffd, UFFDIO_COPY, &c1)) {
					struct uffdio_range r = {.start = addr, .len = pg};
					ioctl(uffd, UFFDIO_WAKE, &r);
				}
			}
		}
	}
}
