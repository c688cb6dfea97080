/**
 * When and how long to wait before sending a failed call again (the TypeScript twin of the Python
 * client's `apptgate_client.retry`).
 *
 * Only UNAVAILABLE is retried by default. The wait before retry `n` (1, 2, …) is exponential
 * backoff with full jitter, never shorter than the server's `RetryInfo` delay:
 *
 *     cap(n)  = min(maxBackoffMs, initialBackoffMs * multiplier ** (n - 1))
 *     wait(n) = max(retryDelayMs, uniform(0, cap(n)))
 *
 * Retries stop after `maxAttempts` sends, or as soon as the next wait would outlast the time left.
 * A watch reopens its stream with the same waits, bounded by time only ({@link resumeDelayMs}).
 *
 * @module
 */

import { Code } from "@connectrpc/connect";

import type { ApptgateError } from "./errors.js";

/** How UNAVAILABLE is retried. `maxAttempts` counts every send, the first included. */
export interface RetryPolicy {
  readonly maxAttempts: number;
  readonly initialBackoffMs: number;
  readonly maxBackoffMs: number;
  readonly multiplier: number;
}

export const DEFAULT_RETRY: RetryPolicy = { maxAttempts: 5, initialBackoffMs: 100, maxBackoffMs: 5000, multiplier: 2 };

/** What a client tells its `onRetry` hook before it waits and sends again (or reopens a watch). */
export interface RetryEvent {
  /** The RPC, for example "ListAppointments" or "WatchConsentRequests". */
  readonly method: string;
  /** The error of the attempt that failed. */
  readonly error: ApptgateError;
  /** The number of that attempt (1 for the first send). */
  readonly attempt: number;
  /** How long the client waits before the next attempt. */
  readonly delayMs: number;
}

/**
 * The wait before sending again after `attempt` failed with `error`, or `undefined` to give up.
 * `remainingMs` is the time left before the call's deadline (`Infinity` for a watch); `retryable`
 * overrides the default rule (only UNAVAILABLE).
 */
export function nextDelayMs(
  policy: RetryPolicy,
  error: ApptgateError,
  attempt: number,
  remainingMs: number,
  retryable: boolean = error.code === Code.Unavailable,
): number | undefined {
  if (!retryable || attempt >= policy.maxAttempts) return undefined;
  const delay = jitteredMs(policy, error, attempt);
  return delay >= remainingMs ? undefined : delay;
}

/**
 * The wait before a watch reopens its stream after `attempt` failed with `error`, or `undefined` to give
 * up: the wait of {@link nextDelayMs}, bounded only by `remainingMs`, what is left of the watch's
 * `resumeTimeoutMs` (`maxAttempts` does not apply). The caller decides whether `error` may be resumed.
 */
export function resumeDelayMs(
  policy: RetryPolicy,
  error: ApptgateError,
  attempt: number,
  remainingMs: number,
): number | undefined {
  const delay = jitteredMs(policy, error, attempt);
  return delay >= remainingMs ? undefined : delay;
}

/** Full jitter, never sooner than the server's RetryInfo asks. */
function jitteredMs(policy: RetryPolicy, error: ApptgateError, attempt: number): number {
  const cap = Math.min(policy.maxBackoffMs, policy.initialBackoffMs * policy.multiplier ** (attempt - 1));
  return Math.max(error.retryDelayMs ?? 0, Math.random() * cap);
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));
