/* Dropout draws from torch's CPU generator, as torch's own Bernoulli kernel makes them on CPUs where it does not
 * use MKL (all but Intel's), in one vectorisable pass instead of one generator call per element.
 *
 * torch's generator is a 32-bit Mersenne Twister (MT19937). Its Bernoulli kernel takes, for each element in
 * order, two 32-bit outputs a then b, forms the 53-bit integer x = (a mod 2^21) * 2^32 + b, and keeps the
 * element when x * 2^-53 < keep_prob, that is when x < ceil(keep_prob * 2^53) (`threshold`, computed exactly by
 * the caller). The twister's state here is torch's: 624 words (stored as 64-bit integers in torch's state
 * buffer), `left` and `next`: the next output is word `next` unless `left` is 1, in which case the state is
 * regenerated first and `next` starts again at 0. models/bernoulli_draws.py checks the result against torch.
 */
#include <stdint.h>

enum { WORDS = 624, SHIFT = 397 };

static inline uint32_t twist(uint32_t upper_from, uint32_t lower_from) {
  uint32_t y = (upper_from & 0x80000000u) | (lower_from & 0x7fffffffu);
  return (y >> 1) ^ ((lower_from & 1u) ? 0x9908b0dfu : 0u);
}

static void regenerate(uint32_t *s) {
  int i = 0;
  for (; i < WORDS - SHIFT; i++) s[i] = s[i + SHIFT] ^ twist(s[i], s[i + 1]);
  for (; i < WORDS - 1; i++) s[i] = s[i + SHIFT - WORDS] ^ twist(s[i], s[i + 1]);
  s[WORDS - 1] = s[SHIFT - 1] ^ twist(s[WORDS - 1], s[0]);
}

static void temper(const uint32_t *s, uint32_t *out, int64_t count) {
  for (int64_t i = 0; i < count; i++) {
    uint32_t y = s[i];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    out[i] = y;
  }
}

static void decide(const uint32_t *words, int64_t count, uint64_t threshold, float scale, uint8_t *kept,
                   float *noise) {
  for (int64_t j = 0; j < count; j++) {
    uint64_t x = ((uint64_t)(words[2 * j] & 0x1fffffu) << 32) | words[2 * j + 1];
    uint8_t keep = x < threshold;
    kept[j] = keep;
    noise[j] = keep ? scale : 0.0f;
  }
}

/* Draws `count` elements: kept[j] (0 or 1) and noise[j] (scale or 0), and advances the generator state
 * (`state_words` [624], `left`, `next`) past the 2 * count outputs it used. */
void draw_dropout(uint64_t *state_words, int32_t *left, uint64_t *next, int64_t count, uint64_t threshold,
                  float scale, uint8_t *kept, float *noise) {
  uint32_t state[WORDS];
  uint32_t words[WORDS + 1]; /* an odd output left from the previous state, then this state's outputs */
  for (int i = 0; i < WORDS; i++) state[i] = (uint32_t)state_words[i];
  int64_t remaining = *left, position = (int64_t)*next, odd = 0;
  while (count > 0) {
    if (remaining <= 1) {
      regenerate(state);
      remaining = WORDS + 1;
      position = 0;
    }
    int64_t take = remaining - 1, wanted = 2 * count - odd;
    if (take > wanted) take = wanted;
    temper(state + position, words + odd, take);
    position += take;
    remaining -= take;
    int64_t have = odd + take, pairs = have / 2;
    decide(words, pairs, threshold, scale, kept, noise);
    kept += pairs;
    noise += pairs;
    count -= pairs;
    odd = have - 2 * pairs;
    if (odd) words[0] = words[have - 1];
  }
  for (int i = 0; i < WORDS; i++) state_words[i] = state[i];
  *left = (int32_t)remaining;
  *next = (uint64_t)position;
}
