// Command sampleimage writes a memory image that compresses the way guest memory does
// (snapshot.SampleImage), for measuring faultline pack and restores:
//
//	go run ./examples/sampleimage -size 512 -out mem.raw
package main

import (
	"bufio"
	"flag"
	"log"
	"os"

	"github.com/faultline-go/faultline/snapshot"
)

func main() {
	size := flag.Int64("size", 512, "image size in MiB")
	seed := flag.Uint64("seed", 1, "the same seed makes the same image")
	out := flag.String("out", "mem.raw", "the file to write")
	flag.Parse()
	f, err := os.Create(*out)
	if err != nil {
		log.Fatal(err)
	}
	w := bufio.NewWriterSize(f, 1<<20)
	if err := snapshot.SampleImage(w, *size<<20, *seed); err != nil {
		log.Fatal(err)
	}
	if err := w.Flush(); err != nil {
		log.Fatal(err)
	}
	if err := f.Close(); err != nil {
		log.Fatal(err)
	}
}
