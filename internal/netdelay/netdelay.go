// Package netdelay is a user-space TCP proxy that adds latency and optionally caps bandwidth,
// for measuring what a network between the daemon and an object store costs where netem (the
// kernel's sch_netem) is not available. Every byte is held for half the round-trip time in each
// direction, so a request and its answer take one RTT more than without the proxy; a bandwidth
// cap paces each direction of the whole proxy (all connections share it, as they would a link).
package netdelay

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Options say what the proxy does to the traffic.
type Options struct {
	RTT time.Duration // added round-trip time (half each way)
	// Bandwidth caps each direction, in bytes per second (0: no cap).
	Bandwidth int64
	// Window bounds the bytes in flight per connection and direction (default 8 MiB): what a
	// TCP window would. Enough for 800 MB/s at 10 ms.
	Window int
}

// A Proxy forwards the connections it accepts to a target address.
type Proxy struct {
	ln     net.Listener
	target string
	o      Options
	up     pacer // client → target
	down   pacer // target → client
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool

	upBytes, downBytes, accepted atomic.Int64
}

// segBytes is the most one read forwards as one segment.
const segBytes = 256 << 10

var segPool = sync.Pool{New: func() any { b := make([]byte, segBytes); return &b }}

// Start listens on listen (e.g. 127.0.0.1:0) and forwards to target.
func Start(listen, target string, o Options) (*Proxy, error) {
	if o.Window <= 0 {
		o.Window = 8 << 20
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, err
	}
	p := &Proxy{ln: ln, target: target, o: o, conns: map[net.Conn]struct{}{}}
	p.up.bw, p.down.bw = o.Bandwidth, o.Bandwidth
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr is the address the proxy listens on.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Stats returns the bytes forwarded each way and the connections accepted.
func (p *Proxy) Stats() (up, down, conns int64) {
	return p.upBytes.Load(), p.downBytes.Load(), p.accepted.Load()
}

// Close stops listening and closes every connection.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	err := p.ln.Close()
	p.wg.Wait()
	return err
}

func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		c.Close()
		return false
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	c.Close()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.accepted.Add(1)
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.serve(c)
		}()
	}
}

func (p *Proxy) serve(c net.Conn) {
	if !p.track(c) {
		return
	}
	defer p.untrack(c)
	t, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	if !p.track(t) {
		return
	}
	defer p.untrack(t)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.pipe(t, c, &p.up, &p.upBytes) }()
	go func() { defer wg.Done(); p.pipe(c, t, &p.down, &p.downBytes) }()
	wg.Wait()
}

type segment struct {
	buf *[]byte
	n   int
	at  time.Time // when it was read
	err error     // the read's error, after the bytes (io.EOF: half-close)
}

// pipe copies src to dst, each segment written half an RTT after it was read and paced by pc.
func (p *Proxy) pipe(dst, src net.Conn, pc *pacer, count *atomic.Int64) {
	// The channel's capacity is the window, counted in full segments.
	q := make(chan segment, max(1, p.o.Window/segBytes))
	go func() {
		defer close(q)
		for {
			bp := segPool.Get().(*[]byte)
			n, err := src.Read(*bp)
			q <- segment{buf: bp, n: n, at: time.Now(), err: err}
			if err != nil {
				return
			}
		}
	}()
	half := p.o.RTT / 2
	var werr error
	for s := range q {
		if s.n > 0 && werr == nil {
			if d := time.Until(s.at.Add(half)); d > 0 {
				time.Sleep(d)
			}
			pc.wait(s.n)
			_, werr = dst.Write((*s.buf)[:s.n])
			count.Add(int64(s.n))
		}
		segPool.Put(s.buf)
		if s.err != nil || werr != nil {
			if errors.Is(s.err, io.EOF) && werr == nil {
				if tc, ok := dst.(*net.TCPConn); ok {
					tc.CloseWrite() // pass the half-close on
					continue
				}
			}
			// A failed side: close both, so the reader goroutine ends too.
			dst.Close()
			src.Close()
		}
	}
}

// pacer spaces writes so that they average at most bw bytes per second.
type pacer struct {
	bw   int64
	mu   sync.Mutex
	next time.Time // when the link is free again
}

func (pc *pacer) wait(n int) {
	if pc.bw <= 0 {
		return
	}
	pc.mu.Lock()
	now := time.Now()
	start := pc.next
	if start.Before(now) {
		start = now
	}
	pc.next = start.Add(time.Duration(int64(n) * int64(time.Second) / pc.bw))
	pc.mu.Unlock()
	if d := time.Until(start); d > 0 {
		time.Sleep(d)
	}
}
