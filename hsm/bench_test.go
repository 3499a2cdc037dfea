package hsm

import (
	"context"
	"testing"

	"github.com/kmsgate/kmsgate/internal/testenv"
)

// BenchmarkSign measures the steady-state hot path (checkout, C_SignInit, C_Sign) on SoftHSM2.
func BenchmarkSign(b *testing.B) {
	env := testenv.NewSoftHSM(b, 1)
	s, err := Open(context.Background(), Config{Library: env.Library, Slot: "0", PIN: env.Tokens[0].PIN})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	k, _, err := s.Generate(context.Background(), "bench")
	if err != nil {
		b.Fatal(err)
	}
	d := digest("bench")
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := s.Sign(ctx, k, d); err != nil {
				b.Error(err)
				return
			}
		}
	})
	st := s.Stats()
	if st.ObjectSearches != 0 {
		b.Fatalf("%d object searches while signing", st.ObjectSearches)
	}
}

// BenchmarkRawSign is the floor: C_SignInit + C_Sign on one pre-opened session, no pool.
func BenchmarkRawSign(b *testing.B) {
	env := testenv.NewSoftHSM(b, 1)
	s, err := Open(context.Background(), Config{Library: env.Library, Slot: "0", PIN: env.Tokens[0].PIN, PoolSize: 1})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	k, _, err := s.Generate(context.Background(), "bench")
	if err != nil {
		b.Fatal(err)
	}
	se, err := s.acquire(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	defer s.release(se, nil)
	h, err := s.handle(se, k)
	if err != nil {
		b.Fatal(err)
	}
	d := digest("bench")
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := s.signRaw(se, h, d); err != nil {
			b.Fatal(err)
		}
	}
}
