// A small target for map-probe's gobin tests. The tests find the lines
// marked INLINE-BODY, INLINE-CALL and LOCK-CALL to check inline expansion.
package main

import (
	"fmt"
	"os"
	"sync"
)

var (
	mu    sync.Mutex
	table = map[string]int{}
	sink  int
)

// bump is small enough that the compiler inlines it into record.
func bump(n int) int {
	return n*3 + len(os.Args) // INLINE-BODY
}

//go:noinline
func record(key string, n int) {
	mu.Lock()            // LOCK-CALL
	table[key] = bump(n) // INLINE-CALL
	mu.Unlock()
}

//go:noinline
func spin(n int) int {
	total := 0
	for i := 0; i < n; i++ {
		total += i ^ (i >> 3)
	}
	return total
}

func main() {
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 100; i++ {
				record(fmt.Sprintf("k%d", (g+i)%7), i)
			}
		}(g)
	}
	wg.Wait()
	sink = spin(len(table))
	fmt.Println(len(table), sink)
}
