package netdelay

import (
	"bytes"
	"io"
	"math/rand/v2"
	"net"
	"testing"
	"time"
)

// echo starts a TCP server that echoes every connection back.
func echo(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

func start(t *testing.T, o Options) *Proxy {
	t.Helper()
	p, err := Start("127.0.0.1:0", echo(t), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// Each request-answer exchange through the proxy takes at least the RTT, and the bytes come
// back unchanged, in order.
func TestRTT(t *testing.T) {
	const rtt = 20 * time.Millisecond
	p := start(t, Options{RTT: rtt})
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 100)
	for i := range 5 {
		msg := bytes.Repeat([]byte{byte('a' + i)}, 100)
		t0 := time.Now()
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(t0); d < rtt {
			t.Fatalf("exchange %d took %v, less than the RTT %v", i, d, rtt)
		}
		if !bytes.Equal(buf, msg) {
			t.Fatalf("exchange %d: wrong bytes", i)
		}
	}
	c.Close()
	p.Close() // waits for the connection's goroutines: their counts are final
	up, down, conns := p.Stats()
	if up != 500 || down != 500 || conns != 1 {
		t.Fatalf("stats: up %d down %d conns %d", up, down, conns)
	}
}

// A bandwidth cap: 2 MiB each way at 20 MB/s takes at least 0.1 s, and arrives whole; a
// half-close is passed on (the echo server sees EOF and closes, so the client reads EOF).
func TestBandwidth(t *testing.T) {
	const bw = 20e6
	p := start(t, Options{Bandwidth: bw})
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	data := make([]byte, 2<<20)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	t0 := time.Now()
	go func() {
		c.Write(data)
		c.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	d := time.Since(t0)
	if !bytes.Equal(got, data) {
		t.Fatalf("got %d bytes, not the %d sent", len(got), len(data))
	}
	if min := time.Duration(float64(len(data)) / bw * float64(time.Second)); d < min*9/10 {
		t.Fatalf("2 MiB at %.0f MB/s took %v, under %v", bw/1e6, d, min)
	}
}
