// go-peer is the reference peer for updraft-spdy's interop test: the same SPDY/3.1 library
// Kubernetes API servers use (github.com/moby/spdystream), as client or server on loopback.
//
//	go-peer client ADDR   connect, open streams, send data, check the echo; accept a pushed stream and hash it
//	go-peer server        listen on 127.0.0.1:0, print "LISTEN <addr>", echo every stream of one connection
//
// Prints "OK ..." and exits 0 on success; anything else is a failure.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/moby/spdystream"
)

// payload is deterministic pseudo-random data (xorshift32) so both sides can generate it.
func payload(seed uint32, n int) []byte {
	out := make([]byte, n)
	x := seed*2654435761 + 1
	for i := range out {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		out[i] = byte(x)
	}
	return out
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "go-peer: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: go-peer client ADDR | go-peer server")
	}
	switch os.Args[1] {
	case "client":
		if len(os.Args) != 3 {
			fail("usage: go-peer client ADDR")
		}
		client(os.Args[2])
	case "server":
		server()
	default:
		fail("unknown mode %q", os.Args[1])
	}
}

const streams = 4
const streamBytes = 3 << 20

func client(addr string) {
	tcp, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		fail("dial: %v", err)
	}
	conn, err := spdystream.NewConnection(tcp, false)
	if err != nil {
		fail("new connection: %v", err)
	}
	pushed := make(chan string, 1)
	go conn.Serve(func(s *spdystream.Stream) {
		// Called on spdystream's frame goroutine: reply here, work elsewhere.
		if err := s.SendReply(http.Header{"Pushed": {"accepted"}}, false); err != nil {
			pushed <- "reply: " + err.Error()
			return
		}
		go func() {
			h := sha256.New()
			n, err := io.Copy(h, s)
			if err != nil {
				pushed <- "read pushed stream: " + err.Error()
				return
			}
			sum := hex.EncodeToString(h.Sum(nil))
			if _, err := s.Write([]byte(sum)); err != nil {
				pushed <- "write hash: " + err.Error()
				return
			}
			s.Close()
			pushed <- fmt.Sprintf("pushed streamtype=%s bytes=%d", s.Headers().Get("Streamtype"), n)
		}()
	})

	var wg sync.WaitGroup
	errs := make(chan error, streams)
	for i := 0; i < streams; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			errs <- clientStream(conn, i)
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			fail("%v", err)
		}
	}
	if _, err := conn.Ping(); err != nil {
		fail("ping: %v", err)
	}
	var pushedResult string
	select {
	case pushedResult = <-pushed:
	case <-time.After(30 * time.Second):
		fail("no pushed stream from the server")
	}
	conn.Close()
	fmt.Printf("OK streams=%d bytes=%d %s\n", streams, streamBytes, pushedResult)
}

func clientStream(conn *spdystream.Connection, i int) error {
	headers := http.Header{
		"Streamtype": {"data"},
		"Port":       {strconv.Itoa(8080 + i)},
		"Requestid":  {strconv.Itoa(i)},
	}
	s, err := conn.CreateStream(headers, nil, false)
	if err != nil {
		return fmt.Errorf("create stream %d: %w", i, err)
	}
	if err := s.WaitTimeout(30 * time.Second); err != nil {
		return fmt.Errorf("stream %d reply: %w", i, err)
	}
	data := payload(uint32(i), streamBytes)
	want := sha256.Sum256(data)
	got := make(chan []byte, 1)
	go func() {
		h := sha256.New()
		io.Copy(h, s)
		got <- h.Sum(nil)
	}()
	for off := 0; off < len(data); off += 32 << 10 {
		end := min(off+32<<10, len(data))
		if _, err := s.Write(data[off:end]); err != nil {
			return fmt.Errorf("stream %d write: %w", i, err)
		}
	}
	if err := s.Close(); err != nil {
		return fmt.Errorf("stream %d close: %w", i, err)
	}
	select {
	case sum := <-got:
		if hex.EncodeToString(sum) != hex.EncodeToString(want[:]) {
			return fmt.Errorf("stream %d: echo hash %x, sent %x", i, sum, want)
		}
	case <-time.After(60 * time.Second):
		return fmt.Errorf("stream %d: echo timed out", i)
	}
	return nil
}

func server() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fail("listen: %v", err)
	}
	fmt.Printf("LISTEN %s\n", ln.Addr())
	tcp, err := ln.Accept()
	if err != nil {
		fail("accept: %v", err)
	}
	conn, err := spdystream.NewConnection(tcp, true)
	if err != nil {
		fail("new connection: %v", err)
	}
	var mu sync.Mutex
	echoed := 0
	go conn.Serve(func(s *spdystream.Stream) {
		reply := http.Header{"Echo": {"yes"}, "Requestid": {s.Headers().Get("Requestid")}}
		if err := s.SendReply(reply, false); err != nil {
			fail("reply: %v", err)
		}
		go func() {
			n, err := io.Copy(s, s)
			if err != nil {
				fail("echo: %v", err)
			}
			s.Close()
			mu.Lock()
			echoed++
			mu.Unlock()
			_ = n
		}()
	})
	<-conn.CloseChan()
	mu.Lock()
	defer mu.Unlock()
	fmt.Printf("OK echoed=%d\n", echoed)
}
