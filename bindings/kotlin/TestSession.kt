// The Kotlin binding of the fedhive device SDK against a real server.
//
// One device with 500 Fashion-MNIST images (passed as a ByteArray) enrols, joins a FedAvg task of the
// built-in MLP (1 device a round, 2 rounds) and trains until it finishes. Its first round is cancelled
// from the progress listener at the first training step and resumed by the next call. Then the
// server's rounds are checked over HTTP: both committed, each with the device's 500 samples once.
//
// Compiled with the generated `uniffi/fedhive_ffi/fedhive_ffi.kt` and run by the end-to-end test
// `tests/tests/kotlin_binding.rs`: `java ... TestSessionKt SERVER ADMIN_TOKEN STATE_DIR`. Any failure
// is an exception (non-zero exit).

import java.io.DataInputStream
import java.io.FileInputStream
import java.net.URI
import java.net.http.HttpClient
import java.net.http.HttpRequest
import java.net.http.HttpResponse
import java.util.zip.GZIPInputStream
import uniffi.fedhive_ffi.BuiltinModel
import uniffi.fedhive_ffi.DeviceSession
import uniffi.fedhive_ffi.FedhiveException
import uniffi.fedhive_ffi.ProgressListener
import uniffi.fedhive_ffi.RoundLimits
import uniffi.fedhive_ffi.RoundResult
import uniffi.fedhive_ffi.createBuiltinTask
import uniffi.fedhive_ffi.createEnrolmentKey

const val DATA = "/usr/share/datasets/fashion-mnist"
const val PIXELS = 28 * 28

/** The first `n` training images (row-major bytes) and their labels. */
fun fashionMnist(n: Int): Pair<ByteArray, ByteArray> {
    fun open(name: String) = DataInputStream(GZIPInputStream(FileInputStream("$DATA/$name")))
    val pixels = open("train-images-idx3-ubyte.gz").use { f ->
        check(f.readInt() == 2051) { "not an IDX image file" }
        f.readInt()
        check(f.readInt() * f.readInt() == PIXELS) { "not 28x28 images" }
        ByteArray(n * PIXELS).also { f.readFully(it) }
    }
    val labels = open("train-labels-idx1-ubyte.gz").use { f ->
        check(f.readInt() == 2049) { "not an IDX label file" }
        f.readInt()
        ByteArray(n).also { f.readFully(it) }
    }
    return Pair(pixels, labels)
}

/** Records the stages it hears; cancels `session`'s round at its first training step if given. */
class Stages(private var cancelAtTraining: DeviceSession? = null) : ProgressListener {
    val heard = mutableListOf<String>()

    override fun onProgress(stage: String, roundId: Long, step: ULong, totalSteps: ULong) {
        heard.add(stage)
        if (stage == "training") {
            cancelAtTraining?.cancel()
            cancelAtTraining = null
        }
    }
}

fun main(args: Array<String>) {
    val (server, adminToken, state) = args
    val task = createBuiltinTask(server, adminToken, BuiltinModel.MLP, 1u, 2u, true)
    val key = createEnrolmentKey(server, adminToken, "kotlin-test")

    // Bad input is a Kotlin exception with a message, not a crash.
    try {
        DeviceSession(server, task, "$state/bad", BuiltinModel.MLP, ByteArray(10), ByteArray(1), null)
        error("10 pixels for 1 label were accepted")
    } catch (e: FedhiveException) {
        check("784 per label" in e.message.orEmpty()) { "unexpected message: ${e.message}" }
    }

    val (pixels, labels) = fashionMnist(500)
    val session = DeviceSession(server, task, "$state/device", BuiltinModel.MLP, pixels, labels, 7uL)
    val deviceId = session.enrol(key)
    check(session.enrol(key) == deviceId) { "a second enrol must keep the stored identity" }

    val first = Stages(cancelAtTraining = session)
    val stopped = session.runRound(RoundLimits(null, null), first)
    check(stopped is RoundResult.Stopped && stopped.reason == "cancelled") { "$stopped" }
    check(first.heard.take(3) == listOf("checked_in", "downloaded", "training")) { "${first.heard}" }
    val outcomes = mutableListOf("stopped ${stopped.roundId}")

    var contributed = 0
    while (true) {
        val stages = Stages()
        when (val r = session.runRound(RoundLimits(600_000uL, null), stages)) {
            is RoundResult.Contributed -> {
                check(r.numSamples == 500uL && r.loss > 0f) { "$r" }
                check(stages.heard.takeLast(2) == listOf("upload_acknowledged", "reported")) {
                    "${stages.heard}"
                }
                if (contributed == 0) {
                    check(r.resumed && r.roundId == stopped.roundId) { "the cancelled round was redone: $r" }
                }
                contributed += 1
                outcomes.add("contributed ${r.roundId} resumed=${r.resumed}")
            }
            is RoundResult.NotNow -> Thread.sleep(r.retryAfterMs.toLong())
            is RoundResult.Finished -> {
                outcomes.add("finished ${r.modelVersion}")
                break
            }
            else -> error("unexpected $r")
        }
    }
    println("device $outcomes")
    check(contributed == 2) { "$outcomes" }

    val request = HttpRequest.newBuilder(URI.create("$server/v1/tasks/$task/rounds"))
        .header("Authorization", "Bearer $adminToken")
        .build()
    val rounds = HttpClient.newHttpClient().send(request, HttpResponse.BodyHandlers.ofString()).body()
    val committed = Regex("\"state\":\"committed\"").findAll(rounds).count()
    val counted = Regex("\"accepted\":1[,}]").findAll(rounds).count()
    val samples = Regex("\"total_samples\":500[,}]").findAll(rounds).count()
    println("rounds: $committed committed, $counted with one update, $samples with 500 samples")
    check(committed == 2 && counted == 2 && samples == 2) { rounds }
    println("kotlin binding: a device completed 2 rounds of a real task")
}
