module updraft.invalid/spdy-go-peer

go 1.22

require github.com/moby/spdystream v0.5.1
