// Package hsm serves PKCS#11 slots for kmsgate: it loads vendor modules with diagnosable
// errors, shares one C_Initialize per library, keeps a fixed pool of logged-in sessions per
// slot, caches object handles, and rebuilds a slot in the background when the token fails.
//
// Why not crypto11: github.com/ThalesGroup/crypto11 v1 puts a session back into its pool even
// after the token declared it dead, and it has no notion of "the slot is down", so after an HSM
// restart every pooled session keeps failing until the process restarts. Recovery here needs to
// retire a whole generation of sessions, re-login, drop cached handles and canary-sign before
// serving again, which means owning the pool; on top of that, crypto11's pool has no
// context-aware checkout and no counters. The pool is therefore built directly on the thin
// github.com/miekg/pkcs11 binding, and crypto11 is not used.
//
// Lifecycle of a slot: Open tries once synchronously and then a supervisor goroutine owns every
// (re)build. A fatal return code (device error, session or login lost, library not initialised)
// retires the current pool generation: requests fail fast with ErrSlotDown while the supervisor
// retries with exponential backoff, re-initialising the library (C_Finalize/C_Initialize, once per
// library generation, shared safely by all slots on it) when reopening sessions alone does not
// help. A wrong PIN stops the retries, because every further attempt would move the token closer
// to locking the PIN.
//
// PKCS#11 login is application-wide per token: a second slot on a token this process is
// already logged in to gets CKR_USER_ALREADY_LOGGED_IN and works whatever its PIN.
package hsm
