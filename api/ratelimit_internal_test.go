package api

import (
	"strconv"
	"testing"
	"time"
)

// TestLimiterSetStaysBounded: buckets of credentials that went quiet are dropped once they have
// refilled, so the map does not grow with every credential ever seen; a busy one is kept.
func TestLimiterSetStaysBounded(t *testing.T) {
	l := newLimiterSet(10, 2)
	now := time.Now()
	busy := limiterKey{"t", "busy"}
	// Ten rounds a second apart, each with 1,000 credentials never seen before (10,000 in all);
	// the busy credential empties its bucket every round.
	for round := range 10 {
		at := now.Add(time.Duration(round) * time.Second)
		l.take(busy, at)
		l.take(busy, at)
		for i := range 1000 {
			l.take(limiterKey{"t", strconv.Itoa(round) + "-" + strconv.Itoa(i)}, at)
		}
		if n := len(l.m); n > 2*minSweep+1 {
			t.Fatalf("round %d: %d limiters kept; want <= %d", round, n, 2*minSweep+1)
		}
	}
	if d := l.take(busy, now.Add(9*time.Second)); d <= 0 {
		t.Fatal("the busy credential's emptied bucket was dropped")
	}
}
