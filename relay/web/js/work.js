// The proof of work a customer does while the node's support-key budget is spent
// (answer `challenge_required`; docs/protocol.md): find a decimal nonce such that
// SHA-256(challenge ":" nonce) starts with `bits` zero bits. The puzzle is
// relay_codec::challenge (codec/src/challenge.rs).
//
// SHA-256 is written out here because WebCrypto's digest() is asynchronous per call, so
// a search over ~2^18 short messages would spend its time waiting on promises; this
// synchronous one does a few million hashes a second. It hashes short messages only
// (one or two blocks), which is all the puzzle needs, and is checked against known
// digests and against the relay by the tests (tests/browser).

const K = new Int32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);
const INIT = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
const W = new Int32Array(64);
const H = new Int32Array(8);
const PAD = new Uint8Array(256);

/** SHA-256 of `bytes` (a Uint8Array), as eight 32-bit words (big-endian order). */
export function sha256Words(bytes) {
  const n = bytes.length;
  const blocks = ((n + 9 + 63) >> 6);
  // Short messages reuse one buffer (no allocation per hash); longer ones get their own.
  const padded = blocks <= 4 ? PAD.subarray(0, blocks * 64) : new Uint8Array(blocks * 64);
  padded.fill(0);
  padded.set(bytes);
  padded[n] = 0x80;
  const bits = n * 8;
  const end = padded.length;
  padded[end - 4] = (bits >>> 24) & 0xff;
  padded[end - 3] = (bits >>> 16) & 0xff;
  padded[end - 2] = (bits >>> 8) & 0xff;
  padded[end - 1] = bits & 0xff;
  H.set(INIT);
  for (let b = 0; b < blocks; b++) {
    const o = b * 64;
    for (let i = 0; i < 16; i++) {
      const j = o + i * 4;
      W[i] = (padded[j] << 24) | (padded[j + 1] << 16) | (padded[j + 2] << 8) | padded[j + 3];
    }
    for (let i = 16; i < 64; i++) {
      const w15 = W[i - 15], w2 = W[i - 2];
      const s0 = ((w15 >>> 7) | (w15 << 25)) ^ ((w15 >>> 18) | (w15 << 14)) ^ (w15 >>> 3);
      const s1 = ((w2 >>> 17) | (w2 << 15)) ^ ((w2 >>> 19) | (w2 << 13)) ^ (w2 >>> 10);
      W[i] = (W[i - 16] + s0 + W[i - 7] + s1) | 0;
    }
    let a = H[0], bb = H[1], c = H[2], d = H[3], e = H[4], f = H[5], g = H[6], h = H[7];
    for (let i = 0; i < 64; i++) {
      const S1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
      const ch = (e & f) ^ (~e & g);
      const t1 = (h + S1 + ch + K[i] + W[i]) | 0;
      const S0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
      const maj = (a & bb) ^ (a & c) ^ (bb & c);
      const t2 = (S0 + maj) | 0;
      h = g; g = f; f = e; e = (d + t1) | 0; d = c; c = bb; bb = a; a = (t1 + t2) | 0;
    }
    H[0] = (H[0] + a) | 0; H[1] = (H[1] + bb) | 0; H[2] = (H[2] + c) | 0; H[3] = (H[3] + d) | 0;
    H[4] = (H[4] + e) | 0; H[5] = (H[5] + f) | 0; H[6] = (H[6] + g) | 0; H[7] = (H[7] + h) | 0;
  }
  return Array.from(H, (x) => x >>> 0);
}

/** SHA-256 of `bytes` as lowercase hex. */
export function sha256Hex(bytes) {
  return sha256Words(bytes).map((w) => w.toString(16).padStart(8, '0')).join('');
}

/** Leading zero bits of a digest given as words. */
function zeroBits(words) {
  let bits = 0;
  for (const w of words) {
    if (w === 0) { bits += 32; continue; }
    return bits + Math.clz32(w);
  }
  return bits;
}

/**
 * Finds the first nonce 0, 1, 2, … that solves `challenge` at `bits`, yielding to the
 * page every few thousand tries (so it stays responsive); `progress(tries)` is called at
 * each yield. Resolves to the nonce as a decimal string.
 */
export async function solveChallenge(challenge, bits, progress = () => {}) {
  const prefix = new TextEncoder().encode(`${challenge}:`);
  const buf = new Uint8Array(prefix.length + 20);
  buf.set(prefix);
  for (let n = 0; ; n++) {
    const digits = String(n);
    for (let i = 0; i < digits.length; i++) buf[prefix.length + i] = digits.charCodeAt(i);
    if (zeroBits(sha256Words(buf.subarray(0, prefix.length + digits.length))) >= bits) return digits;
    if (n % 20000 === 19999) {
      progress(n + 1);
      await new Promise((resolve) => setTimeout(resolve, 0));
    }
  }
}
